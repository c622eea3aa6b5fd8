// Host-side stub: the programs live in the `lb-ebpf` binary built for bpfel-unknown-none.
#![no_std]
