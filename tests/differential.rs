//! Differential proof that the relay authorizes as row-level security does (in progress).

mod common;
