#![no_std]
// This file exists so that the userspace crate can name this package as a
// build dependency (aya-build then builds its binary for the BPF target).
