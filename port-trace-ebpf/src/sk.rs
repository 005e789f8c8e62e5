//! Reading `struct sock` fields with offsets taken from the running kernel's
//! BTF (see `port_trace::offsets`): Rust eBPF has no CO-RE relocations.
//!
//! Every `bpf_probe_read_kernel` call costs tens of nanoseconds (it sets up
//! fault handling), so a socket's `sock_common` head — addresses, ports,
//! family, state, namespace and cookie — is copied in one call ([`Sock`])
//! and its fields are taken from that copy; only fields past the head
//! (`sk_protocol`, `sk_err`, `inet_sport`) and the namespace inode are read
//! one by one.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};
use port_trace_common::{KernelConfig, RawEvent, SOCK_HEAD_BYTES};

use crate::emit::store_addr;

/// Written by the loader (`EbpfLoader::override_global`) before load.
#[unsafe(no_mangle)]
pub(crate) static CONFIG: KernelConfig = KernelConfig {
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
    in_call_slots_mask: 0,
};

/// One setting of [`CONFIG`], read with a load of its own. `CONFIG` lives in
/// a frozen read-only map, so the verifier knows each such load as a
/// constant (`bpf_map_direct_read`): offsets into the stack copy of a
/// socket stay constant offsets, and branches on settings are pruned.
/// Volatile, so that the compiler does not fold the zero initialiser.
macro_rules! setting {
    ($($field:ident).+) => {
        // SAFETY: a read of our own read-only global.
        unsafe { core::ptr::read_volatile(&$crate::sk::CONFIG.$($field).+) }
    };
}
pub(crate) use setting;

/// False until the loader has written [`CONFIG`]: programs then do nothing.
#[inline(always)]
pub fn configured() -> bool {
    setting!(abi_version) != 0
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The kernel address of a socket as a plain number.
///
/// The verifier forbids arithmetic on socket pointers (`PTR_TO_SOCKET`, a
/// `cgroup/sock_addr` context's `sk`); copying the pointer through
/// `bpf_probe_read_kernel` from the stack yields a scalar that may be offset
/// and passed back to `bpf_probe_read_kernel`. Where no offset is taken,
/// [`addr_of_arg`] is a cast.
#[inline(always)]
pub fn addr_of<T>(ptr: *const T) -> u64 {
    let slot: *const T = ptr;
    // SAFETY: reads 8 bytes of our own stack.
    unsafe { bpf_probe_read_kernel(&slot as *const *const T as *const u64) }.unwrap_or(0)
}

/// The kernel address of a socket the verifier hands us as a pointer: a
/// cast, where [`addr_of`] costs a helper call. The loader holds
/// CAP_PERFMON (`bpf_probe_read_kernel` needs it anyway), so the verifier
/// lets such pointers be passed to helpers as plain arguments and stored in
/// maps and events (`allow_ptr_leaks`). For:
/// - tracing program arguments: tp_btf, fentry/fexit and iterator arguments
///   (typed pointers, which may be offset), raw tracepoint and kprobe
///   arguments (plain numbers already);
/// - a `cgroup/sock` program's context (`post_bind4/6`, `sock_release`),
///   which *is* the `struct sock`: a context pointer may be offset too;
/// - a `cgroup/sock_addr` context's `sk` (`PTR_TO_SOCKET`) that is only
///   kept in a map for a later program, which loads it back as a number:
///   the verifier forbids any arithmetic on `PTR_TO_SOCKET`, so a program
///   that reads through it at an offset needs [`addr_of`].
#[inline(always)]
pub fn addr_of_arg(ptr: *mut core::ffi::c_void) -> u64 {
    ptr as u64
}

/// One kernel value at `base + offset` (zero when unreadable).
#[inline(always)]
pub fn read<T: Default>(base: u64, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.unwrap_or_default()
}

/// True when the event for this network namespace must be dropped.
#[inline(always)]
pub fn filtered_out(netns: u32) -> bool {
    let wanted = setting!(netns_filter);
    wanted != 0 && wanted != netns
}

/// The first [`SOCK_HEAD_BYTES`] of a socket (its `sock_common`), aligned
/// like the kernel's, so that naturally aligned fields load as words.
#[repr(C, align(8))]
struct Head([u8; SOCK_HEAD_BYTES]);

/// A socket: its kernel address and a copy of its `sock_common`.
pub struct Sock {
    /// Kernel address of the `struct sock` (or `inet_timewait_sock`).
    pub addr: u64,
    head: Head,
}

impl Sock {
    /// Copies the head of the socket at `addr` in one read (zeroes when
    /// unreadable). Full sockets and TIME_WAIT sockets both start with a
    /// `sock_common`, and both are larger than the head.
    #[inline(always)]
    pub fn load(addr: u64) -> Self {
        let mut sock = core::mem::MaybeUninit::<Sock>::uninit();
        let ptr = sock.as_mut_ptr();
        // SAFETY: writes both fields of our own stack slot before it is
        // assumed initialised; the helper zero-fills the head on failure.
        unsafe {
            (*ptr).addr = addr;
            generated::bpf_probe_read_kernel(
                (&raw mut (*ptr).head).cast(),
                SOCK_HEAD_BYTES as u32,
                addr as *const core::ffi::c_void,
            );
            sock.assume_init()
        }
    }

    /// The head field of type `T` at `offset` (the loader checked that
    /// every head offset fits and is aligned; the check here is for the
    /// compiler and is pruned by the verifier).
    #[inline(always)]
    fn field<T: Copy + Default>(&self, offset: u32) -> T {
        let offset = offset as usize;
        if offset + core::mem::size_of::<T>() > SOCK_HEAD_BYTES {
            return T::default();
        }
        // SAFETY: in bounds (checked above) and aligned (checked by the
        // loader against the kernel's own layout).
        unsafe { core::ptr::read(self.head.0.as_ptr().add(offset).cast::<T>()) }
    }

    /// `skc_num`: the local port the socket holds now (0: none).
    #[inline(always)]
    pub fn port_held(&self) -> u16 {
        self.field(setting!(offsets.skc_num))
    }

    /// `skc_state`.
    #[inline(always)]
    pub fn state(&self) -> u8 {
        self.field(setting!(offsets.skc_state))
    }

    /// `skc_family`.
    #[inline(always)]
    pub fn family(&self) -> u16 {
        self.field(setting!(offsets.skc_family))
    }

    /// `skc_cookie`: set once anything asked for the socket's cookie (every
    /// cgroup hook of ours does, so every socket we follow has one); 0
    /// otherwise.
    #[inline(always)]
    pub fn stored_cookie(&self) -> u64 {
        self.field(setting!(offsets.skc_cookie))
    }

    /// Network namespace inode of the socket.
    #[inline(always)]
    pub fn netns(&self) -> u32 {
        let net: u64 = self.field(setting!(offsets.skc_net));
        if net == 0 {
            return 0;
        }
        read(net, setting!(offsets.net_ns_inum))
    }

    /// `sk_protocol` (full sockets only: past the head).
    #[inline(always)]
    pub fn protocol(&self) -> u16 {
        read(self.addr, setting!(offsets.sk_protocol))
    }

    /// `sk_err` (full sockets only).
    #[inline(always)]
    pub fn sk_err(&self) -> i32 {
        read(self.addr, setting!(offsets.sk_err))
    }

    /// Fills family, ports and addresses of `ev` from the head, and the
    /// protocol. `lport` is `skc_num`, falling back to `inet_sport` when the
    /// port was already put back (`__inet_put_port` zeroes `skc_num` but not
    /// `inet_sport`).
    #[inline(always)]
    pub fn fill_tuple(&self, protocol: u16, ev: &mut RawEvent) {
        ev.sk_addr = self.addr;
        ev.family = self.family();
        ev.protocol = protocol;
        let num = self.port_held();
        ev.lport = if num != 0 { num } else { u16::from_be(read(self.addr, setting!(offsets.inet_sport))) };
        ev.rport = u16::from_be(self.field(setting!(offsets.skc_dport)));
        if ev.family == AF_INET6 {
            store_addr(&mut ev.laddr, self.field(setting!(offsets.skc_v6_rcv_saddr)));
            store_addr(&mut ev.raddr, self.field(setting!(offsets.skc_v6_daddr)));
        } else if ev.family == AF_INET {
            store_addr(&mut ev.laddr, [self.field(setting!(offsets.skc_rcv_saddr)), 0, 0, 0]);
            store_addr(&mut ev.raddr, [self.field(setting!(offsets.skc_daddr)), 0, 0, 0]);
        }
    }

    /// The inode of a full socket's `struct socket` (what `/proc/PID/fd`
    /// links name), 0 when it has none.
    #[inline(always)]
    pub fn inode(&self) -> u32 {
        let socket: u64 = read(self.addr, setting!(offsets.sk_socket));
        if socket == 0 {
            return 0;
        }
        let file: u64 = read(socket, setting!(offsets.socket_file));
        if file == 0 {
            return 0;
        }
        let inode: u64 = read(file, setting!(offsets.file_inode));
        if inode == 0 {
            return 0;
        }
        read::<u64>(inode, setting!(offsets.inode_ino)) as u32
    }
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
pub fn cookie_of(how: Cookie, sk_ptr: *mut core::ffi::c_void, sock: &Sock) -> u64 {
    match how {
        // SAFETY: sk_ptr is a typed socket argument of a tracing program.
        Cookie::Helper => unsafe { generated::bpf_get_socket_cookie(sk_ptr) },
        Cookie::Stored => sock.stored_cookie(),
    }
}

/// Sets `ev.cookie` (obtained `how`), flagging stored cookies.
#[inline(always)]
pub fn put_cookie(ev: &mut RawEvent, how: Cookie, cookie: u64) {
    ev.cookie = cookie;
    if let Cookie::Stored = how {
        ev.flags |= port_trace_common::flags::STORED_COOKIE;
    }
}

/// True for a socket none of our hooks or walks ever asked the cookie of,
/// when userspace joins events by cookie ([`options::KEYED_BY_COOKIE`]):
/// nothing we follow, so its events need not leave the kernel.
///
/// [`options::KEYED_BY_COOKIE`]: port_trace_common::options::KEYED_BY_COOKIE
#[inline(always)]
pub fn unknown_to_us(cookie: u64) -> bool {
    cookie == 0 && setting!(options) & port_trace_common::options::KEYED_BY_COOKIE != 0
}
