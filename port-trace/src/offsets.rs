//! The kernel struct offsets the eBPF programs need, from the running
//! kernel's BTF (they differ between kernels: `sock.sk_protocol` moved
//! between 6.1 and 6.18).

use anyhow::{bail, Context, Result};
use port_trace_common::{KernelOffsets, SOCK_HEAD_BYTES};

use crate::btf::Btf;

/// Looks up one field and checks that it has the width the programs read.
fn field(btf: &Btf, path: &str, size: u32) -> Result<u32> {
    let field = btf.field(path)?;
    if field.size != size {
        bail!("{path} is {} bytes on this kernel, expected {size}", field.size);
    }
    Ok(field.offset)
}

/// Where `struct pt_regs` keeps the syscall number on this architecture.
fn syscall_nr_offset(btf: &Btf) -> Result<u32> {
    if cfg!(target_arch = "x86_64") {
        field(btf, "pt_regs.orig_ax", 8)
    } else if cfg!(target_arch = "aarch64") {
        field(btf, "pt_regs.syscallno", 4)
    } else {
        bail!("port-trace does not know this architecture's pt_regs")
    }
}

/// Every offset in [`KernelOffsets`], checked for width.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets> {
    let get = || -> Result<KernelOffsets> {
        Ok(KernelOffsets {
            skc_daddr: field(btf, "sock_common.skc_daddr", 4)?,
            skc_rcv_saddr: field(btf, "sock_common.skc_rcv_saddr", 4)?,
            skc_dport: field(btf, "sock_common.skc_dport", 2)?,
            skc_num: field(btf, "sock_common.skc_num", 2)?,
            skc_family: field(btf, "sock_common.skc_family", 2)?,
            skc_net: field(btf, "sock_common.skc_net.net", 8)?,
            skc_v6_daddr: field(btf, "sock_common.skc_v6_daddr", 16)?,
            skc_v6_rcv_saddr: field(btf, "sock_common.skc_v6_rcv_saddr", 16)?,
            sk_protocol: field(btf, "sock.sk_protocol", 2)?,
            sk_err: field(btf, "sock.sk_err", 4)?,
            inet_sport: field(btf, "inet_sock.inet_sport", 2)?,
            net_ns_inum: field(btf, "net.ns.inum", 4)?,
            skc_cookie: field(btf, "sock_common.skc_cookie", 8)?,
            skc_state: field(btf, "sock_common.skc_state", 1)?,
            tw_tb: field(btf, "inet_timewait_sock.tw_tb", 8)?,
            pt_regs_syscall: syscall_nr_offset(btf)?,
            sk_socket: field(btf, "sock.sk_socket", 8)?,
            socket_file: field(btf, "socket.file", 8)?,
            file_inode: field(btf, "file.f_inode", 8)?,
            inode_ino: field(btf, "inode.i_ino", 8)?,
        })
    };
    let offsets = get().and_then(|offsets| check_head(&offsets).map(|()| offsets));
    offsets.context("this kernel's socket structures are not what port-trace knows how to read")
}

/// The programs copy a socket's first [`SOCK_HEAD_BYTES`] in one read and
/// load these `sock_common` fields from that copy as aligned words: each must
/// lie inside the copy, at an offset aligned for the width it is loaded as.
fn check_head(o: &KernelOffsets) -> Result<()> {
    // (name, offset, bytes, alignment of the load)
    let fields = [
        ("skc_daddr", o.skc_daddr, 4, 4),
        ("skc_rcv_saddr", o.skc_rcv_saddr, 4, 4),
        ("skc_dport", o.skc_dport, 2, 2),
        ("skc_num", o.skc_num, 2, 2),
        ("skc_family", o.skc_family, 2, 2),
        ("skc_state", o.skc_state, 1, 1),
        ("skc_net", o.skc_net, 8, 8),
        ("skc_v6_daddr", o.skc_v6_daddr, 16, 4),
        ("skc_v6_rcv_saddr", o.skc_v6_rcv_saddr, 16, 4),
        ("skc_cookie", o.skc_cookie, 8, 8),
    ];
    for (name, offset, bytes, align) in fields {
        if offset as usize + bytes > SOCK_HEAD_BYTES {
            bail!(
                "sock_common.{name} ends at byte {}, past the {SOCK_HEAD_BYTES} bytes read at once",
                offset as usize + bytes
            );
        }
        if offset % align != 0 {
            bail!("sock_common.{name} sits at byte {offset}, not {align}-byte aligned");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF must yield every offset (every supported
    /// kernel has BTF; a kernel without it cannot run port-trace at all).
    #[test]
    fn running_kernel_offsets_resolve() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let offsets = kernel_offsets(&btf).expect("offsets");
        // struct sock starts with struct sock_common; the v6 addresses follow
        // the v4 ones, and sk_protocol lies past sock_common.
        assert!(offsets.skc_v6_daddr > offsets.skc_daddr);
        assert!(offsets.sk_protocol > offsets.skc_v6_rcv_saddr);
        assert_eq!(offsets.skc_num, offsets.skc_dport + 2);
    }

    /// A layout whose cookie lies past the one-read head is refused with
    /// the field's name, not loaded into programs that would read zeroes.
    #[test]
    fn head_fields_past_the_copy_are_refused() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let mut offsets = kernel_offsets(&btf).expect("offsets");
        check_head(&offsets).expect("the running kernel fits");
        offsets.skc_cookie = SOCK_HEAD_BYTES as u32;
        let error = check_head(&offsets).unwrap_err().to_string();
        assert!(error.contains("skc_cookie"), "{error}");
        offsets.skc_cookie = 90;
        let error = check_head(&offsets).unwrap_err().to_string();
        assert!(error.contains("aligned"), "{error}");
    }
}
