//! Controller of the XDP service load balancer: loads the kernel programs embedded at build time,
//! attaches them and reads their counters.

pub mod announce;
pub mod api;
pub mod api_events;
pub mod assign;
pub mod conntrack;
pub mod controller;
pub mod crd;
pub mod dataplane;
pub mod events;
pub mod health;
pub mod host;
pub mod ipam;
pub mod lease;
pub mod maglev;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod pins;
pub mod pods;
pub mod privileges;
pub mod redirects;
pub mod rtnetlink;
pub mod source;
pub mod syscall;
pub mod views;

pub use dataplane::{AttachMode, Dataplane, DataplaneError};
