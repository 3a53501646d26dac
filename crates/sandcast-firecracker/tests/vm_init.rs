//! Builds the agent's microVM init module (`sandcast-agent/src/vm_init.rs`)
//! here too and runs its unit tests, so the guest half of this backend is
//! checked with it.

#[allow(dead_code)]
#[path = "../../sandcast-agent/src/vm_init.rs"]
mod vm_init;
