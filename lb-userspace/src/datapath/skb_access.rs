//! Lets the TC programs read `ip_summed` of the kernel's `struct sk_buff` (whether a
//! packet's L4 checksum is whole or only its pseudo-header part), so that they update it
//! inline instead of through two `bpf_l4_csum_replace` calls per rewrite (lb-ebpf's `skb`).
//!
//! That takes the kfunc `bpf_cast_to_kern_ctx`, which the pinned aya cannot resolve: the
//! object carries a placeholder helper call instead, rewritten here into the kfunc call with
//! the id the running kernel's BTF gives it, and the field's place, also from that BTF, goes
//! into a read-only global. Without the kfunc or the field (a kernel older than 6.2, one
//! without BTF or not compiling BPF programs) the placeholder becomes `r0 = 0` on a path
//! the programs then never take, and they use the helpers as before.
use lb_common::skb_access::CAST_TO_KERN_CTX_MARKER;

/// Where the kernel's BTF is (`CONFIG_DEBUG_INFO_BTF`).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// 0 when the kernel interprets BPF programs instead of compiling them.
const JIT_ENABLE: &str = "/proc/sys/net/core/bpf_jit_enable";

/// What the running kernel offers for the read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkbAccess {
    /// BTF id of `bpf_cast_to_kern_ctx` and bit offset of `ip_summed` in `struct sk_buff`.
    KernCtx { cast_id: u32, ip_summed_bit: u32 },
    /// No read: the programs use the checksum helpers.
    Helpers,
}

impl SkbAccess {
    /// From the running kernel's BTF; `Helpers`, with the reason logged, where it lacks
    /// either part.
    pub fn probe() -> Self {
        // The verifier refuses kfunc calls in programs it will not JIT.
        if std::fs::read_to_string(JIT_ENABLE).is_ok_and(|v| v.trim() == "0") {
            log::info!("TC checksum updates go through the kernel's helpers ({JIT_ENABLE}: 0)");
            return Self::Helpers;
        }
        match std::fs::read(VMLINUX_BTF)
            .map_err(|e| BtfError::Read(e.to_string()))
            .and_then(|btf| Self::from_btf(&btf))
        {
            Ok(access) => {
                log::info!(
                    "TC checksum updates inline (ip_summed read through bpf_cast_to_kern_ctx, \
                     {access:?})"
                );
                access
            }
            Err(e) => {
                log::info!(
                    "TC checksum updates go through the kernel's helpers ({VMLINUX_BTF}: {e})"
                );
                Self::Helpers
            }
        }
    }

    /// From a kernel BTF blob.
    pub fn from_btf(btf: &[u8]) -> Result<Self, BtfError> {
        let types = Btf::parse(btf)?;
        let cast_id = types
            .find(KIND_FUNC, "bpf_cast_to_kern_ctx")
            .ok_or(BtfError::Missing("kfunc bpf_cast_to_kern_ctx"))?;
        let skb = types
            .find(KIND_STRUCT, "sk_buff")
            .ok_or(BtfError::Missing("struct sk_buff"))?;
        let (bit, bits) = types
            .member(skb, "ip_summed", 0)
            .ok_or(BtfError::Missing("sk_buff.ip_summed"))?;
        // The programs read the one byte holding two bits.
        if bits != 2 || bit % 8 + 2 > 8 || bit == 0 {
            return Err(BtfError::Missing(
                "sk_buff.ip_summed as a 2-bit field in one byte",
            ));
        }
        Ok(Self::KernCtx {
            cast_id,
            ip_summed_bit: bit,
        })
    }

    /// The global `lb_common::skb_access::IP_SUMMED_BIT` (0: helpers).
    pub fn ip_summed_bit(self) -> u32 {
        match self {
            Self::KernCtx { ip_summed_bit, .. } => ip_summed_bit,
            Self::Helpers => 0,
        }
    }

    /// `object` (an eBPF ELF) with every placeholder call rewritten; how many there were.
    pub fn patch(self, object: &mut [u8]) -> Result<usize, BtfError> {
        let marker = insn(BPF_CALL, 0, CAST_TO_KERN_CTX_MARKER);
        let with = match self {
            Self::KernCtx { cast_id, .. } => insn(BPF_CALL, PSEUDO_KFUNC_CALL << 4, cast_id),
            Self::Helpers => insn(MOV64_IMM, 0, 0),
        };
        let mut patched = 0;
        for range in text_sections(object)? {
            let text = &mut object[range];
            for slot in text.chunks_exact_mut(8) {
                if *slot == marker {
                    slot.copy_from_slice(&with);
                    patched += 1;
                }
            }
        }
        Ok(patched)
    }
}

/// `BPF_JMP | BPF_CALL`.
const BPF_CALL: u8 = 0x85;
/// `BPF_ALU64 | BPF_MOV | BPF_K`.
const MOV64_IMM: u8 = 0xb7;
/// `src_reg` of a call of a kernel function named by BTF id (`BPF_PSEUDO_KFUNC_CALL`).
const PSEUDO_KFUNC_CALL: u8 = 2;

/// An instruction as it sits in a little-endian object: code, registers, offset 0, imm.
fn insn(code: u8, regs: u8, imm: u32) -> [u8; 8] {
    let imm = imm.to_le_bytes();
    [code, regs, 0, 0, imm[0], imm[1], imm[2], imm[3]]
}

/// File ranges of the object's executable sections.
fn text_sections(object: &[u8]) -> Result<Vec<std::ops::Range<usize>>, BtfError> {
    use object::{Object, ObjectSection, SectionKind};
    let file = object::File::parse(object).map_err(|e| BtfError::Object(e.to_string()))?;
    if file.endianness() != object::Endianness::Little {
        return Err(BtfError::Object("not a little-endian eBPF object".into()));
    }
    Ok(file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .filter_map(|s| s.file_range())
        .map(|(at, len)| at as usize..(at + len) as usize)
        .collect())
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading it: {0}")]
    Read(String),
    #[error("not BTF this reader knows: {0}")]
    Format(String),
    #[error("it has no {0}")]
    Missing(&'static str),
    #[error("the eBPF object: {0}")]
    Object(String),
}

/// The little-endian u32 at `at` in `bytes`, if they hold one there.
fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Anonymous structs and unions within each other that [`Btf::member`] looks into.
const MAX_NESTING: u32 = 8;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_FUNC: u32 = 12;
const KIND_TYPE_TAG: u32 = 18;

/// The types of a BTF blob, just enough of them to find a function's id and a struct
/// member's place (include/uapi/linux/btf.h, Documentation/bpf/btf.rst).
struct Btf<'a> {
    strings: &'a [u8],
    /// Type id n at index n - 1: (name offset, info, size or type, its trailing data).
    types: Vec<(u32, u32, u32, &'a [u8])>,
}

impl<'a> Btf<'a> {
    fn parse(blob: &'a [u8]) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Format(what.to_string());
        if blob.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(bad("no little-endian BTF magic"));
        }
        let header = |i: usize| le32(blob, 4 + 4 * i).ok_or_else(|| bad("short header"));
        let hdr_len = header(0)? as usize;
        let (type_off, type_len) = (header(1)? as usize, header(2)? as usize);
        let (str_off, str_len) = (header(3)? as usize, header(4)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off);
            start
                .and_then(|s| blob.get(s..s.checked_add(len)?))
                .ok_or_else(|| bad("section beyond the blob"))
        };
        let (raw, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);
        let mut types = Vec::new();
        let mut at = 0;
        while at < raw.len() {
            let word = |i: usize| le32(raw, at + 4 * i).ok_or_else(|| bad("truncated type"));
            let (name, info, size) = (word(0)?, word(1)?, word(2)?);
            let vlen = (info & 0xffff) as usize;
            let extra = match Self::kind(info) {
                1 | 14 | 17 => 4,
                2 | 7..=12 | 16 | 18 => 0,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                kind => return Err(BtfError::Format(format!("type kind {kind}"))),
            };
            let body = raw
                .get(at + 12..at + 12 + extra)
                .ok_or_else(|| bad("truncated type"))?;
            types.push((name, info, size, body));
            at += 12 + extra;
        }
        Ok(Self { strings, types })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    fn kind(info: u32) -> u32 {
        (info >> 24) & 0x1f
    }

    /// The id of the first type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        let index = self.types.iter().position(|(n, info, ..)| {
            Self::kind(*info) == kind && self.name(*n) == name.as_bytes()
        })?;
        u32::try_from(index + 1).ok()
    }

    /// The type `id` refers to, through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&(u32, u32, u32, &'a [u8])> {
        for _ in 0..32 {
            let ty = self.types.get((id as usize).checked_sub(1)?)?;
            match Self::kind(ty.1) {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_TYPE_TAG => id = ty.2,
                _ => return Some(ty),
            }
        }
        None
    }

    /// Bit offset (from `base`) and bitfield size (0: not a bitfield) of member `name` of
    /// struct or union `id`, looking inside its anonymous struct and union members (at
    /// most `MAX_NESTING` deep: a blob whose anonymous member contains itself ends there).
    fn member(&self, id: u32, name: &str, base: u32) -> Option<(u32, u32)> {
        self.member_within(id, name, base, MAX_NESTING)
    }

    fn member_within(&self, id: u32, name: &str, base: u32, depth: u32) -> Option<(u32, u32)> {
        let depth = depth.checked_sub(1)?;
        let (_, info, _, body) = self.resolve(id)?;
        if !matches!(Self::kind(*info), KIND_STRUCT | KIND_UNION) {
            return None;
        }
        let kind_flag = info >> 31 == 1;
        for m in body.chunks_exact(12) {
            let word = |i: usize| le32(m, 4 * i).expect("a member is 12 bytes");
            let (m_name, m_type, offset) = (word(0), word(1), word(2));
            let (bit, bits) = if kind_flag {
                (offset & 0xff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            let bit = base.checked_add(bit)?;
            if self.name(m_name) == name.as_bytes() {
                return Some((bit, bits));
            }
            if m_name == 0
                && let Some(found) = self.member_within(m_type, name, bit, depth)
            {
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member: name, type id, offset.
    type Member<'a> = (&'a str, u32, u32);
    /// A type: kind, kind_flag, name, size or type, members.
    type Type<'a> = (u32, bool, &'a str, u32, &'a [Member<'a>]);

    /// A BTF blob of `types` with their names in its string section.
    fn blob(types: &[Type]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            at
        };
        let mut raw = Vec::new();
        for (kind, flag, type_name, size, members) in types {
            let info = (kind << 24) | (u32::from(*flag) << 31) | members.len() as u32;
            for word in [name(type_name), info, *size] {
                raw.extend_from_slice(&word.to_le_bytes());
            }
            if *kind == 1 {
                raw.extend_from_slice(&(8u32).to_le_bytes()); // INT: 8 bits
            }
            for (m_name, m_type, offset) in *members {
                for word in [name(m_name), *m_type, *offset] {
                    raw.extend_from_slice(&word.to_le_bytes());
                }
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        for word in [
            24,
            0,
            raw.len() as u32,
            raw.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&raw);
        out.extend_from_slice(&strings);
        out
    }

    /// `sk_buff` as the kernel lays it out: `ip_summed` a 2-bit field of an anonymous
    /// struct inside an anonymous union, found with the offsets of both added up.
    fn kernel_like(with_kfunc: bool) -> Vec<u8> {
        let bitfield = |bit: u32, bits: u32| (bits << 24) | bit;
        let flags = [
            ("pkt_type", 1, bitfield(0, 3)),
            ("ip_summed", 1, bitfield(5, 2)),
        ];
        let skb = [("len", 1, 0), ("", 4, bitfield(1024, 0))];
        let mut types: Vec<Type> = vec![
            (1, false, "__u8", 1, &[]),                          // 1
            (4, true, "", 2, &flags),                            // 2
            (5, false, "", 2, &[("", 2, 0), ("headers", 2, 0)]), // 3
            (8, false, "skb_headers", 3, &[]),                   // 4: a typedef on the way
            (4, true, "sk_buff", 224, &skb),                     // 5
            (13, false, "", 0, &[]),                             // 6: FUNC_PROTO
        ];
        if with_kfunc {
            types.push((12, false, "bpf_cast_to_kern_ctx", 6, &[])); // 7
        }
        blob(&types)
    }

    #[test]
    fn finds_the_kfunc_and_ip_summed_through_anonymous_members() {
        assert_eq!(
            SkbAccess::from_btf(&kernel_like(true)).expect("found"),
            SkbAccess::KernCtx {
                cast_id: 7,
                ip_summed_bit: 1029
            }
        );
    }

    #[test]
    fn a_kernel_without_the_kfunc_gets_the_helpers() {
        let err = SkbAccess::from_btf(&kernel_like(false)).expect_err("no kfunc");
        assert!(err.to_string().contains("bpf_cast_to_kern_ctx"), "{err}");
    }

    #[test]
    fn an_anonymous_member_containing_itself_is_no_endless_search() {
        let itself = [("", 1, 0)];
        let types: [Type; 4] = [
            (4, false, "", 8, &itself),
            (4, false, "sk_buff", 8, &[("", 1, 0)]),
            (13, false, "", 0, &[]),
            (12, false, "bpf_cast_to_kern_ctx", 3, &[]),
        ];
        let err = SkbAccess::from_btf(&blob(&types)).expect_err("no ip_summed");
        assert!(err.to_string().contains("ip_summed"), "{err}");
    }

    #[test]
    fn truncated_or_foreign_blobs_are_errors() {
        let whole = kernel_like(true);
        for len in 0..whole.len() {
            assert!(SkbAccess::from_btf(&whole[..len]).is_err(), "{len} bytes");
        }
        let mut big_endian = whole.clone();
        big_endian[..2].copy_from_slice(&[0xeb, 0x9f]);
        assert!(SkbAccess::from_btf(&big_endian).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_give_an_answer_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut blob = kernel_like(true);
            let at = 24.min(blob.len());
            blob.splice(at.., bytes);
            let _ = SkbAccess::from_btf(&blob);
        }
    }

    /// The machine's own kernel, where it exposes its BTF (kernel 6.2+ has the kfunc).
    #[test]
    fn the_running_kernels_btf() {
        let Ok(btf) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("{VMLINUX_BTF} unreadable: skipped");
            return;
        };
        match SkbAccess::from_btf(&btf).expect("parses") {
            SkbAccess::KernCtx {
                cast_id,
                ip_summed_bit,
            } => {
                assert!(cast_id > 0);
                // Within the struct (224 bytes on 6.18), past its first pointers.
                assert!((64..2048).contains(&ip_summed_bit), "{ip_summed_bit}");
            }
            SkbAccess::Helpers => unreachable!("from_btf answers KernCtx or an error"),
        }
    }

    #[test]
    fn every_placeholder_call_of_the_object_is_rewritten() {
        let marker = insn(BPF_CALL, 0, CAST_TO_KERN_CTX_MARKER);
        let object = crate::ebpf_object();
        let kfunc = SkbAccess::KernCtx {
            cast_id: 4242,
            ip_summed_bit: 1029,
        };
        let mut counts = Vec::new();
        for (access, with) in [
            (kfunc, insn(BPF_CALL, 0x20, 4242)),
            (SkbAccess::Helpers, insn(MOV64_IMM, 0, 0)),
        ] {
            let mut patched = object.to_vec();
            let n = access.patch(&mut patched).expect("an eBPF object");
            assert!(n >= 2, "both rewrites (IPv4, IPv6) read ip_summed: {n}");
            let slots = |o: &[u8], insn: [u8; 8]| -> usize {
                text_sections(o)
                    .expect("sections")
                    .into_iter()
                    .map(|r| o[r].chunks_exact(8).filter(|s| *s == insn).count())
                    .sum()
            };
            assert_eq!(slots(&patched, marker), 0, "{access:?}");
            assert_eq!(slots(object, marker), n);
            assert_eq!(slots(&patched, with), slots(object, with) + n, "{access:?}");
            // Nothing else changed.
            let changed = object.iter().zip(&patched).filter(|(a, b)| a != b).count();
            assert!(changed <= 8 * n, "{changed} bytes for {n} calls");
            counts.push(n);
        }
        assert_eq!(counts[0], counts[1]);
    }
}
