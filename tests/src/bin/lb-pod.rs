//! A stand-in for the tutorial's tomcat container: an HTTP/1.1 server on port 8080 that answers
//! every request with its pod name (keep-alive, a thread per connection), and a UDP echo on the
//! same port. `GET /bytes/N` answers N bytes of zeros instead (a download, for the benchmarks'
//! byte counts). Run inside a pod's network namespace by the sandbox: `lb-pod NAME [PORT
//! [PUSH_PORT]]`.
//!
//! On PUSH_PORT (9090) it plays a server that speaks first (server push, websockets, long
//! polls): TCP connections there are accepted and held silent; a UDP datagram to the same port
//! makes it write its name, the datagram's text and a newline on every held connection, and
//! answers `pushed N`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
};

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
    let listener = TcpListener::bind(("::", port))?;
    let response: Arc<[u8]> = {
        let body = format!("{name}\n");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into()
    };
    // A thread per connection: however hard a load generator's keep-alive connections press,
    // another client's request waits for nothing but a CPU (a shared request queue let a
    // loaded pod leave one waiting for seconds).
    for stream in listener.incoming().flatten() {
        let response = response.clone();
        std::thread::spawn(move || serve_http(stream, &response));
    }
    Ok(())
}

/// Answers every request on `stream` with `response` until the client closes, asks to close
/// (`Connection: close`, or HTTP/1.0 without keep-alive), or sends something that is not a
/// request head.
fn serve_http(stream: TcpStream, response: &[u8]) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The next line into `line`; false at the end of the stream or on an error.
    let next_line = |reader: &mut BufReader<TcpStream>, line: &mut String| {
        line.clear();
        matches!(reader.read_line(line), Ok(n) if n > 0)
    };
    loop {
        if !next_line(&mut reader, &mut line) {
            return;
        }
        let request_line = line.trim_end().to_owned();
        if request_line.is_empty() {
            // Stray blank lines between requests are allowed (RFC 9112, 2.2).
            continue;
        }
        let mut keep_alive = request_line.ends_with("HTTP/1.1");
        let mut body_length = 0usize;
        loop {
            if !next_line(&mut reader, &mut line) {
                return;
            }
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some((field, value)) = header.split_once(':') {
                match (field.trim(), value.trim()) {
                    ("connection", "close") => keep_alive = false,
                    ("connection", "keep-alive") => keep_alive = true,
                    ("content-length", n) => body_length = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        // A request body, if any, is read and ignored.
        if std::io::copy(
            &mut std::io::Read::take(&mut reader, body_length as u64),
            &mut std::io::sink(),
        )
        .is_err()
        {
            return;
        }
        let written = match download_size(&request_line) {
            Some(size) => write_bytes(&mut writer, size),
            None => writer.write_all(response),
        };
        if written.is_err() || !keep_alive {
            return;
        }
    }
}

/// N of a `GET /bytes/N ...` request line.
fn download_size(request_line: &str) -> Option<u64> {
    let path = request_line.strip_prefix("GET /bytes/")?;
    path.split(' ').next()?.parse().ok()
}

/// An answer of `size` bytes of zeros.
fn write_bytes(writer: &mut TcpStream, size: u64) -> std::io::Result<()> {
    writer.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
        )
        .as_bytes(),
    )?;
    std::io::copy(&mut std::io::Read::take(std::io::repeat(0), size), writer)?;
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
