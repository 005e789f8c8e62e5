//! Reading `struct sock` fields with offsets taken from the running kernel's
//! BTF (see `port_trace::btf`): Rust eBPF has no CO-RE relocations.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie};
use port_trace_common::{KernelConfig, RawEvent};

/// Written by the loader (`EbpfLoader::override_global`) before load.
#[unsafe(no_mangle)]
static CONFIG: KernelConfig = KernelConfig {
    abi_version: 0,
    netns_filter: 0,
    offsets: port_trace_common::KernelOffsets {
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        sk_protocol: 0,
        sk_err: 0,
        inet_sport: 0,
        net_ns_inum: 0,
        skc_cookie: 0,
        skc_state: 0,
        tw_tb: 0,
        pt_regs_syscall: 0,
        sk_socket: 0,
        socket_file: 0,
        file_inode: 0,
        inode_ino: 0,
    },
    wakeup_bytes: 0,
    options: 0,
};

#[inline(always)]
pub fn config() -> KernelConfig {
    // SAFETY: a read of our own read-only global; volatile so that the
    // compiler does not fold the zero initialiser.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The kernel address of a socket as a plain number.
///
/// The verifier forbids arithmetic on context and socket pointers; copying the
/// pointer through `bpf_probe_read_kernel` from the stack yields a scalar that
/// may be offset and passed back to `bpf_probe_read_kernel`.
#[inline(always)]
pub fn addr_of<T>(ptr: *const T) -> u64 {
    let slot: *const T = ptr;
    // SAFETY: reads 8 bytes of our own stack.
    unsafe { bpf_probe_read_kernel(&slot as *const *const T as *const u64) }.unwrap_or(0)
}

#[inline(always)]
pub fn read<T: Default>(base: u64, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.unwrap_or_default()
}

/// Network namespace inode of the socket at `sk`.
#[inline(always)]
pub fn netns_of(cfg: &KernelConfig, sk: u64) -> u32 {
    let net: u64 = read(sk, cfg.offsets.skc_net);
    if net == 0 {
        return 0;
    }
    read(net, cfg.offsets.net_ns_inum)
}

/// True when the event for this network namespace must be dropped.
#[inline(always)]
pub fn filtered_out(cfg: &KernelConfig, netns: u32) -> bool {
    cfg.netns_filter != 0 && cfg.netns_filter != netns
}

/// Fills family, protocol, ports and addresses of `ev` from the socket at
/// `sk`. `lport` is `skc_num`, falling back to `inet_sport` when the port was
/// already put back (`__inet_put_port` zeroes `skc_num` but not `inet_sport`).
#[inline(always)]
pub fn fill_tuple(cfg: &KernelConfig, sk: u64, ev: &mut RawEvent) {
    let o = &cfg.offsets;
    ev.sk_addr = sk;
    ev.family = read(sk, o.skc_family);
    ev.protocol = read(sk, o.sk_protocol);
    let num: u16 = read(sk, o.skc_num);
    ev.lport = if num != 0 { num } else { u16::from_be(read(sk, o.inet_sport)) };
    ev.rport = u16::from_be(read(sk, o.skc_dport));
    if ev.family == AF_INET6 {
        ev.laddr = read(sk, o.skc_v6_rcv_saddr);
        ev.raddr = read(sk, o.skc_v6_daddr);
    } else if ev.family == AF_INET {
        let l: [u8; 4] = read(sk, o.skc_rcv_saddr);
        let r: [u8; 4] = read(sk, o.skc_daddr);
        ev.laddr[..4].copy_from_slice(&l);
        ev.raddr[..4].copy_from_slice(&r);
    }
}

/// `skc_num` of the socket: the local port it holds now (0: none).
#[inline(always)]
pub fn local_port_held(cfg: &KernelConfig, sk: u64) -> u16 {
    read(sk, cfg.offsets.skc_num)
}

/// `sk_err` of the socket.
#[inline(always)]
pub fn sk_err(cfg: &KernelConfig, sk: u64) -> i32 {
    read(sk, cfg.offsets.sk_err)
}

/// `sk_protocol` of the socket.
#[inline(always)]
pub fn protocol(cfg: &KernelConfig, sk: u64) -> u16 {
    read(sk, cfg.offsets.sk_protocol)
}

/// `sk_cookie`: set once anything asked for the socket's cookie (every cgroup
/// hook of ours does, so every socket we follow has one); 0 otherwise.
#[inline(always)]
pub fn stored_cookie(cfg: &KernelConfig, sk: u64) -> u64 {
    read(sk, cfg.offsets.skc_cookie)
}

/// `skc_state` of the socket.
#[inline(always)]
pub fn state(cfg: &KernelConfig, sk: u64) -> u8 {
    read(sk, cfg.offsets.skc_state)
}

/// How a program learns the socket cookie.
#[derive(Clone, Copy)]
pub enum Cookie {
    /// `bpf_get_socket_cookie` on the typed pointer (tp_btf, fentry/fexit):
    /// assigns one if the socket has none yet.
    Helper,
    /// Read `sk_cookie` (raw_tp, kprobes, where the helper is not offered):
    /// 0 while nothing asked for one.
    Stored,
}

/// The socket's cookie, the way `how` allows.
#[inline(always)]
pub fn cookie_of(how: Cookie, sk_ptr: *mut core::ffi::c_void, cfg: &KernelConfig, sk: u64) -> u64 {
    match how {
        // SAFETY: sk_ptr is a typed socket argument of a tracing program.
        Cookie::Helper => unsafe { bpf_get_socket_cookie(sk_ptr) },
        Cookie::Stored => stored_cookie(cfg, sk),
    }
}

/// Sets `ev.cookie` the way `how` allows, flagging stored cookies.
#[inline(always)]
pub fn set_cookie(ev: &mut RawEvent, how: Cookie, sk_ptr: *mut core::ffi::c_void, cfg: &KernelConfig, sk: u64) {
    ev.cookie = cookie_of(how, sk_ptr, cfg, sk);
    if let Cookie::Stored = how {
        ev.flags |= port_trace_common::flags::STORED_COOKIE;
    }
}

/// The inode of a full socket's `struct socket` (what `/proc/PID/fd` links
/// name), 0 when it has none.
#[inline(always)]
pub fn inode_of(cfg: &KernelConfig, sk: u64) -> u32 {
    let o = &cfg.offsets;
    let socket: u64 = read(sk, o.sk_socket);
    if socket == 0 {
        return 0;
    }
    let file: u64 = read(socket, o.socket_file);
    if file == 0 {
        return 0;
    }
    let inode: u64 = read(file, o.file_inode);
    if inode == 0 {
        return 0;
    }
    read::<u64>(inode, o.inode_ino) as u32
}
