//! How a hook reads a map through a helper that is also a BPF subprogram.
//!
//! Every BPF-to-BPF call costs its return: about 8 ns on the bench's AMD EPYC, whose kernel
//! returns through the Safe-RET thunk (a third of the trivial TC program's whole cost). The
//! pod hooks, which run for every packet of every pod, read inline; `xlb_external` calls,
//! where inlining multiplied the verifier's walk (the reply filter: 66k to 117k
//! instructions; the reply claim: to 85k) and the reads are on its rarer paths.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Inline,
    Call,
}
