//! A stand-in for the tutorial's tomcat container: an HTTP server on port 8080 that answers
//! every request with its pod name, and a UDP echo on the same port. Run inside a pod's network
//! namespace by the sandbox: `lb-pod NAME [PORT]`.

use std::net::UdpSocket;

/// Threads answering requests.
const WORKERS: usize = 4;

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
    let server = std::sync::Arc::new(
        tiny_http::Server::http(("::", port)).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let body = format!("{name}\n");
    // Several workers, so that a load generator's keep-alive connections cannot starve another
    // client's request.
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (server, body) = (server.clone(), body.clone());
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    let _ = request.respond(tiny_http::Response::from_string(body.clone()));
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}
