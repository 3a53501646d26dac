//! sandcast-agent: the first process inside every session.

fn main() {}
