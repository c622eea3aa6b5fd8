//! The read commands' reports (`xlb services|conntrack|stats|explain`), built from the pinned
//! maps alone so they work with or without a running agent.
pub mod explain;
pub mod inspect;
