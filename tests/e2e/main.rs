//! End-to-end tests: one binary, one module per capability. Each test starts a server
//! in-process on loopback port 0 and talks to it over real sockets.

mod client;
mod common;

mod chat;
