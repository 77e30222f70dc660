//! One rtnetlink socket and the one request/answer exchange over it, for the pod discovery
//! (`RTM_GETROUTE`, `RTM_GETLINK`) and the announcements (`RTM_NEWROUTE` / `RTM_DELROUTE` in
//! their table), in the calling thread's network namespace.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A route message for the host route to `addr` (`/32` or `/128`): what `ip route get ADDR`
/// asks, and what an announcement adds.
pub fn host_route(addr: IpAddr) -> RouteMessage {
    let mut message = RouteMessage::default();
    let (family, length) = match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    message.header.address_family = family;
    message.header.destination_prefix_length = length;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    message
}

/// Errors of an rtnetlink exchange.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket failed.
    #[error("rtnetlink: {action}: {source}")]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("rtnetlink: an answer that does not parse: {0}")]
    Decode(String),
    /// The kernel refused the request (its error code).
    #[error("rtnetlink: {0}")]
    Refused(io::Error),
}

/// What a request asks for, which decides how its answers end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchange {
    /// A dump (`NLM_F_DUMP`): every answer until the kernel says done.
    Dump,
    /// One object (`ip route get`): its one answer.
    Get,
    /// A change with these flags (`NLM_F_CREATE`, `NLM_F_REPLACE`, ...), acknowledged.
    Change(u16),
}

/// An rtnetlink socket.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl RouteSocket {
    /// Opens the socket in the calling thread's network namespace. `strict`: the kernel
    /// filters dumps by the request's fields (the table of a route dump), as
    /// `NETLINK_GET_STRICT_CHK` asks; kernels without it ignore it (callers filter too).
    pub fn open(strict: bool) -> Result<Self, NetlinkError> {
        let socket_error = |action| move |source| NetlinkError::Socket { action, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_error("opening"))?;
        socket.bind_auto().map_err(socket_error("binding"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_error("connecting"))?;
        if strict {
            let _ = socket.set_netlink_get_strict_chk(true);
        }
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `request` and collects its answers (none for an acknowledged change); the
    /// kernel's refusal is [`NetlinkError::Refused`].
    pub fn ask(
        &mut self,
        request: RouteNetlinkMessage,
        exchange: Exchange,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        // Flags are set whole: NLM_F_REPLACE shares a bit with NLM_F_DUMP, so a change must
        // never be read as a dump.
        header.flags = NLM_F_REQUEST
            | match exchange {
                Exchange::Dump => NLM_F_DUMP,
                Exchange::Get => 0,
                Exchange::Change(flags) => flags | NLM_F_ACK,
            };
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        let socket_error = |action| move |source| NetlinkError::Socket { action, source };
        self.socket
            .send(&buffer, 0)
            .map_err(socket_error("sending"))?;
        let refused = |code: i32| NetlinkError::Refused(io::Error::from_raw_os_error(code.abs()));
        let mut answers = Vec::new();
        loop {
            let (received, _) = self
                .socket
                .recv_from_full()
                .map_err(socket_error("receiving"))?;
            let mut offset = 0;
            while offset < received.len() {
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&received[offset..])
                        .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let length = message.header.length as usize;
                if message.header.sequence_number == self.sequence {
                    match message.payload {
                        NetlinkPayload::InnerMessage(inner) => {
                            answers.push(inner);
                            if exchange == Exchange::Get {
                                return Ok(answers);
                            }
                        }
                        NetlinkPayload::Done(done) if done.code < 0 => {
                            return Err(refused(done.code));
                        }
                        NetlinkPayload::Done(_) => return Ok(answers),
                        NetlinkPayload::Error(e) => match e.code {
                            None => return Ok(answers),
                            Some(code) => return Err(refused(code.get())),
                        },
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}
