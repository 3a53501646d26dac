//! Builds and checks sandcast root file system images (directory, ext4, manifest).
