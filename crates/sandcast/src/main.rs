//! The sandcast command.

fn main() {}
