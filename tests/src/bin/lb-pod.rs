//! A stand-in for the tutorial's tomcat container: an HTTP server on port 8080 that answers
//! every request with its pod name, and a UDP echo on the same port. Run inside a pod's network
//! namespace by the sandbox: `lb-pod NAME [PORT [PUSH_PORT]]`.
//!
//! On PUSH_PORT (9090) it plays a server that speaks first (server push, websockets, long
//! polls): TCP connections there are accepted and held silent; a UDP datagram to the same port
//! makes it write its name, the datagram's text and a newline on every held connection, and
//! answers `pushed N`.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
};

/// Threads answering requests.
const WORKERS: usize = 4;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pod".into());
    let port: u16 = args.next().map_or(Ok(8080), |p| p.parse())?;
    let push_port: u16 = args.next().map_or(Ok(9090), |p| p.parse())?;
    serve_push(&name, push_port)?;
    let udp = UdpSocket::bind(("::", port))?;
    std::thread::spawn(move || {
        // Room for the largest datagram: fragmented ones are echoed whole.
        let mut buf = vec![0u8; 65536];
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

/// Holds the connections to `port` and writes `name` on all of them at each UDP datagram.
fn serve_push(name: &str, port: u16) -> anyhow::Result<()> {
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let listener = TcpListener::bind(("::", port))?;
    let trigger = UdpSocket::bind(("::", port))?;
    let accepted = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            accepted.lock().expect("not poisoned").push(stream);
        }
    });
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = trigger.recv_from(&mut buf) {
            let token = String::from_utf8_lossy(&buf[..n]).into_owned();
            let line = format!("{name} {token}\n");
            let mut streams = held.lock().expect("not poisoned");
            streams.retain_mut(|s| s.write_all(line.as_bytes()).is_ok());
            let _ = trigger.send_to(format!("pushed {}", streams.len()).as_bytes(), peer);
        }
    });
    Ok(())
}
