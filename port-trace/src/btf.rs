//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just
//! enough to find struct member offsets and whether a function or BTF
//! tracepoint exists.
//!
//! Rust eBPF built with bpf-linker gets no CO-RE relocations, so the field
//! offsets the programs read are looked up here, in the running kernel's BTF,
//! and handed to them in a read-only global. aya parses BTF too, but keeps the
//! type accessors private; the format is small and stable (see
//! `Documentation/bpf/btf.rst`), so this reads only what it needs.

use anyhow::{bail, Context, Result};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One struct or union member.
#[derive(Debug, Clone)]
struct Member {
    /// Offset of the name in the string section.
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The parts of a BTF type this reader uses. Names stay offsets into the
/// string section: the kernel's BTF has over 100 000 types, and only a few
/// dozen are ever looked up.
#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    /// Offset of the name in the string section.
    name: u32,
    /// Size in bytes (int, struct, union, enum, float) or the referenced type
    /// id (ptr, typedef, const, volatile, restrict, func, var, type tag).
    size_or_type: u32,
    /// Element type and count for arrays.
    array: Option<(u32, u32)>,
    members: Vec<Member>,
}

/// A member's place and width inside its outermost struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Size in bytes of the member's type.
    pub size: u32,
}

/// Parsed kernel BTF.
pub struct Btf {
    /// Index 0 is `void`.
    types: Vec<Type>,
    /// The string section.
    strings: Vec<u8>,
}

fn u16_at(data: &[u8], at: usize) -> Result<u16> {
    let bytes = data.get(at..at + 2).context("BTF truncated")?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("BTF truncated")?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The NUL-terminated string at `offset` (empty when out of range).
fn str_at(strings: &[u8], offset: u32) -> &[u8] {
    let rest = strings.get(offset as usize..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    &rest[..end]
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        const PATH: &str = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(PATH).with_context(|| {
            format!("cannot read {PATH}: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF=y is needed)")
        })?;
        Self::parse(&data).with_context(|| format!("cannot parse {PATH}"))
    }

    /// Parses raw little-endian BTF.
    pub fn parse(data: &[u8]) -> Result<Self> {
        if u16_at(data, 0)? != BTF_MAGIC {
            bail!("not BTF (bad magic, or big-endian)");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data =
            data.get(hdr_len + type_off..hdr_len + type_off + type_len).context("BTF type section out of range")?;
        let strings =
            data.get(hdr_len + str_off..hdr_len + str_off + str_len).context("BTF string section out of range")?;

        let mut types = vec![Type { kind: 0, name: 0, size_or_type: 0, array: None, members: Vec::new() }];
        let mut at = 0usize;
        while at < types_data.len() {
            let name_off = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let size_or_type = u32_at(types_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            if name_off as usize >= strings.len() {
                bail!("BTF string offset out of range");
            }
            let mut ty = Type { kind, name: name_off, size_or_type, array: None, members: Vec::new() };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => {
                    ty.array = Some((u32_at(types_data, at)?, u32_at(types_data, at + 8)?));
                    at += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let raw_offset = u32_at(types_data, at + 8)?;
                        let (bit_offset, bitfield_size) =
                            if kind_flag { (raw_offset & 0xff_ffff, raw_offset >> 24) } else { (raw_offset, 0) };
                        ty.members.push(Member {
                            name: u32_at(types_data, at)?,
                            type_id: u32_at(types_data, at + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => {}
                other => bail!("unknown BTF kind {other}"),
            }
            types.push(ty);
        }
        types.shrink_to_fit();
        Ok(Self { types, strings: strings.to_vec() })
    }

    fn name_is(&self, offset: u32, name: &str) -> bool {
        str_at(&self.strings, offset) == name.as_bytes()
    }

    fn named(&self, name: &str, kind: u32) -> Option<u32> {
        self.types.iter().position(|t| t.kind == kind && self.name_is(t.name, name)).map(|id| id as u32)
    }

    /// True when the kernel has a function of this name (fentry/kprobe target).
    pub fn has_function(&self, name: &str) -> bool {
        self.named(name, KIND_FUNC).is_some()
    }

    /// True when the kernel has a BTF tracepoint of this name (`tp_btf/NAME`).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.named(&format!("btf_trace_{name}"), KIND_TYPEDEF).is_some()
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].size_or_type
                }
                _ => break,
            }
        }
        id
    }

    fn size_of(&self, id: u32) -> u32 {
        let id = self.resolve(id);
        let ty = &self.types[id as usize];
        match ty.kind {
            KIND_PTR => 8,
            KIND_ARRAY => {
                let (elem, count) = ty.array.unwrap_or((0, 0));
                self.size_of(elem) * count
            }
            _ => ty.size_or_type,
        }
    }

    /// Finds `name` among the members of struct/union `id`, looking through
    /// anonymous struct and union members; returns (bit offset, type id).
    fn find_member(&self, id: u32, name: &str) -> Option<(u32, u32, u32)> {
        let ty = &self.types[self.resolve(id) as usize];
        for member in &ty.members {
            if self.name_is(member.name, name) {
                return Some((member.bit_offset, member.type_id, member.bitfield_size));
            }
        }
        for member in &ty.members {
            if member.name == 0 {
                if let Some((off, ty, bits)) = self.find_member(member.type_id, name) {
                    return Some((member.bit_offset + off, ty, bits));
                }
            }
        }
        None
    }

    /// Offset and size of a member path such as `sock_common.skc_num` or
    /// `net.ns.inum` (the first element names a struct).
    pub fn field(&self, path: &str) -> Result<Field> {
        let mut parts = path.split('.');
        let root = parts.next().context("empty field path")?;
        let mut id = self.named(root, KIND_STRUCT).with_context(|| format!("struct {root} not in kernel BTF"))?;
        let mut bits = 0u32;
        let mut found_any = false;
        for part in parts {
            let (off, member_ty, bitfield) =
                self.find_member(id, part).with_context(|| format!("{path}: no member {part} in kernel BTF"))?;
            if bitfield != 0 {
                bail!("{path}: {part} is a bitfield, which the programs cannot read");
            }
            bits += off;
            id = member_ty;
            found_any = true;
        }
        if !found_any {
            bail!("{path}: no member named");
        }
        if !bits.is_multiple_of(8) {
            bail!("{path}: not byte aligned");
        }
        Ok(Field { offset: bits / 8, size: self.size_of(id) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: int (id 1, 4 bytes), short (id 2), an anonymous
    /// struct { short a; short b; } (id 3), struct outer { int x; union-like
    /// anon member at 32; } (id 4), a typedef and a func.
    fn sample() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let (int, short, outer, x, a, b, f, tp) = (
            name("int"),
            name("short"),
            name("outer"),
            name("x"),
            name("a"),
            name("b"),
            name("inet_put_port"),
            name("btf_trace_inet_sock_set_state"),
        );
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        push(&[int, KIND_INT << 24, 4, 32]); // 1
        push(&[short, KIND_INT << 24, 2, 16]); // 2
        push(&[0, KIND_STRUCT << 24 | 2, 4, a, 2, 0, b, 2, 16]); // 3 anon
        push(&[outer, KIND_STRUCT << 24 | 2, 8, x, 1, 0, 0, 3, 32]); // 4
        push(&[f, KIND_FUNC << 24, 0]); // 5
        push(&[tp, KIND_TYPEDEF << 24, 1]); // 6
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_structs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.field("outer.x").unwrap(), Field { offset: 0, size: 4 });
        assert_eq!(btf.field("outer.a").unwrap(), Field { offset: 4, size: 2 });
        assert_eq!(btf.field("outer.b").unwrap(), Field { offset: 6, size: 2 });
        assert!(btf.field("outer.c").is_err());
        assert!(btf.field("nope.x").is_err());
        assert!(btf.has_function("inet_put_port"));
        assert!(!btf.has_function("nope"));
        assert!(btf.has_btf_tracepoint("inet_sock_set_state"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[0u8; 3]).is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
        let mut truncated = sample();
        truncated.truncate(40);
        assert!(Btf::parse(&truncated).is_err());
    }
}
