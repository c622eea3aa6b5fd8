//! Program return codes of the TC hooks (XDP's come from `aya_ebpf::bindings::xdp_action`).

// As i32 on every target: the generated bindings differ in signedness by arch.
/// Next program on tcx (so other programs still see the packet), else the default action.
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
