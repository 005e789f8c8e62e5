//! The records port-trace reports: one per port allocation, failed
//! allocation, TCP state change and release, each naming the port and its
//! owner. Produced by the [`crate::tracker`], printed by [`crate::output`].

use std::net::IpAddr;

use crate::model::{Comm, Family, Origin, Proto, ReleaseReason, TcpState};

/// The port a record is about, and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRef {
    /// Socket cookie: joins every record of one socket and its TIME_WAIT.
    pub sock: u64,
    /// Network namespace inode.
    pub netns: u32,
    /// Protocol.
    pub proto: Proto,
    /// Family.
    pub family: Family,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port.
    pub lport: u16,
    /// Remote address, when connected.
    pub raddr: Option<IpAddr>,
    /// Remote port, when connected.
    pub rport: Option<u16>,
    /// Owner's thread-group id (the allocating process, also on releases
    /// that ran in softirq context).
    pub pid: u32,
    /// Owner's command name.
    pub comm: Comm,
    /// Owner's cgroup v2 id (0 when unknown).
    pub cgroup: u64,
    /// Whether the kernel chose the port (`None` when the allocation was not
    /// seen).
    pub ephemeral: Option<bool>,
}

/// What a record says about its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordBody {
    /// The socket got the port.
    Alloc {
        /// How.
        origin: Origin,
        /// Whether the kernel chose it.
        ephemeral: bool,
    },
    /// The kernel could not give the socket a port.
    AllocFail {
        /// Positive errno value.
        errno: i32,
        /// The operation that asked for a port.
        origin: Origin,
    },
    /// A TCP state change of the port's socket.
    State {
        /// Before.
        old: TcpState,
        /// After.
        new: TcpState,
    },
    /// The port went back to the pool.
    Release {
        /// Why.
        reason: ReleaseReason,
        /// Nanoseconds from allocation, `None` when the allocation was not seen.
        held_ns: Option<u64>,
        /// How the port was allocated, when seen.
        origin: Option<Origin>,
        /// CLOCK_BOOTTIME of the allocation, when seen.
        alloc_ts_ns: Option<u64>,
    },
}

impl RecordBody {
    /// The `type` name in JSON and the EVENT column in text.
    pub fn type_name(&self) -> &'static str {
        match self {
            RecordBody::Alloc { .. } => "alloc",
            RecordBody::AllocFail { .. } => "alloc_fail",
            RecordBody::State { .. } => "state",
            RecordBody::Release { .. } => "release",
        }
    }
}

/// One record about one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRecord {
    /// CLOCK_BOOTTIME nanoseconds when the kernel saw it.
    pub ts_ns: u64,
    /// The port and its owner.
    pub port: PortRef,
    /// What happened.
    pub body: RecordBody,
}
