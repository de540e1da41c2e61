//! End-to-end tests: one binary, one module per capability. Each test starts a server
//! in-process on loopback port 0 and talks to it over real sockets.

#![allow(dead_code)]

mod client;
mod common;

mod abuse;
mod api;
mod appserver;
mod auth;
mod bosh;
mod browser;
mod chat;
mod cli;
mod crash;
mod durability;
mod faults;
mod history;
mod limits;
mod mobile;
mod negotiation;
mod portability;
mod push;
mod roster_presence;
mod routing;
mod secrets;
mod services;
mod upload;
mod websocket;
