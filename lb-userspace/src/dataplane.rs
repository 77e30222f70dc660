//! Loading, attaching and reading the kernel side.

use aya::{
    Ebpf, EbpfError,
    maps::{MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{Counter, Reason};
use tracing::{info, warn};

/// The `lb-ebpf` object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the XDP entry point in `lb-ebpf`.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Name of the per-CPU counters map in `lb-ebpf`.
pub const STATS_MAP: &str = "STATS";

/// Errors of loading, attaching and reading the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP` and has no kernel object.
    #[error(
        "this binary was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it without that variable"
    )]
    NoObject,
    /// The kernel refused the object or one of its maps.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// The object lacks a program or map this controller expects.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The missing item's name.
        name: &'static str,
    },
    /// Loading or attaching a program failed.
    #[error("{action} the XDP program on {iface}: {source}")]
    Program {
        /// What was being done.
        action: &'static str,
        /// The interface concerned.
        iface: String,
        /// The underlying error.
        source: ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The underlying error.
        source: MapError,
    },
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode if the driver lacks XDP support.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// The loaded kernel programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<(String, XdpLinkId)>,
}

impl Dataplane {
    /// Loads the embedded object into the kernel and verifies its XDP program.
    pub fn load() -> Result<Self, DataplaneError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        let program = xdp_program_mut(&mut ebpf)?;
        program.load().map_err(|source| DataplaneError::Program {
            action: "loading",
            iface: "(none)".into(),
            source,
        })?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// The XDP program, for running packets through it with [`aya::programs::TestRun`].
    pub fn xdp_program(&self) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(XDP_PROGRAM)
            .and_then(|program| program.try_into().ok())
            .ok_or(DataplaneError::Missing {
                kind: "program",
                name: XDP_PROGRAM,
            })
    }

    /// Attaches the XDP program to `iface` and returns the mode the kernel accepted.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<XdpMode, DataplaneError> {
        let program = xdp_program_mut(&mut self.ebpf)?;
        let attach = |program: &mut Xdp, mode| {
            program
                .attach(iface, mode)
                .map_err(|source| DataplaneError::Program {
                    action: "attaching",
                    iface: iface.to_owned(),
                    source,
                })
        };
        let (link, used) = match mode {
            AttachMode::Native => (attach(program, XdpMode::Driver)?, XdpMode::Driver),
            AttachMode::Generic => (attach(program, XdpMode::Skb)?, XdpMode::Skb),
            AttachMode::Auto => match attach(program, XdpMode::Driver) {
                Ok(link) => (link, XdpMode::Driver),
                Err(native_error) => {
                    warn!(%iface, error = %native_error, "native XDP refused, falling back to generic (skb) mode");
                    (attach(program, XdpMode::Skb)?, XdpMode::Skb)
                }
            },
        };
        info!(%iface, mode = mode_name(used), "XDP program attached");
        self.attached.push((iface.to_owned(), link));
        Ok(used)
    }

    /// Detaches the XDP program from every interface it was attached to.
    pub fn detach_all(&mut self) -> Result<(), DataplaneError> {
        let program = xdp_program_mut(&mut self.ebpf)?;
        for (iface, link) in self.attached.drain(..) {
            program
                .detach(link)
                .map_err(|source| DataplaneError::Program {
                    action: "detaching",
                    iface: iface.clone(),
                    source,
                })?;
            info!(%iface, "XDP program detached");
        }
        Ok(())
    }

    /// Counters summed over all CPUs, one per [`Reason`], in index order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, Counter)>, DataplaneError> {
        let map_error = |source| DataplaneError::Map {
            name: STATS_MAP,
            source,
        };
        let map = self.ebpf.map(STATS_MAP).ok_or(DataplaneError::Missing {
            kind: "map",
            name: STATS_MAP,
        })?;
        let stats = PerCpuArray::<_, Counter>::try_from(map).map_err(map_error)?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = stats.get(&(reason as u32), 0).map_err(map_error)?;
                let total = per_cpu.iter().fold(Counter::default(), |a, b| a.plus(*b));
                Ok((reason, total))
            })
            .collect()
    }

    /// The summed counter of one reason.
    pub fn reason_counter(&self, reason: Reason) -> Result<Counter, DataplaneError> {
        Ok(self.reason_counters()?[reason as usize].1)
    }
}

fn xdp_program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    ebpf.program_mut(XDP_PROGRAM)
        .and_then(|program| program.try_into().ok())
        .ok_or(DataplaneError::Missing {
            kind: "program",
            name: XDP_PROGRAM,
        })
}

/// The operator-facing name of an XDP attach mode.
pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic (skb)",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "kernel default",
    }
}
