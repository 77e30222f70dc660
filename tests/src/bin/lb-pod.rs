//! A stand-in for the tutorial's tomcat container: an HTTP server on port 8080 that answers
//! every request with its pod name, and a UDP echo on the same port. Run inside a pod's network
//! namespace by the sandbox: `lb-pod NAME [PORT]`.

use std::net::UdpSocket;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pod".into());
    let port: u16 = args.next().map_or(Ok(8080), |p| p.parse())?;
    let udp = UdpSocket::bind(("::", port))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    let server = tiny_http::Server::http(("::", port)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = format!("{name}\n");
    for request in server.incoming_requests() {
        let _ = request.respond(tiny_http::Response::from_string(body.clone()));
    }
    Ok(())
}
