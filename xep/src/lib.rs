//! Halyard's protocol modules.
//!
//! One file per XEP (or RFC 6121 feature), each opening with the spec it implements and what of it
//! is supported, and exposing `register(&mut Registry)`. The core (`halyard` crate) owns sockets,
//! sessions and storage; modules see it only through the [`Host`] trait defined here, so each can
//! be tested with an in-memory host.
//!
//! Map:
//! - [`stanza`]: the parsed header the router works with, and stanza-error builders;
//! - [`registry`]: what modules register (IQ handlers by namespace, message/presence hooks with a
//!   priority, disco features, session events);
//! - [`host`]: the core's services as modules see them, and the store traits modules persist
//!   through;
//! - protocol modules: [`roster`], [`presence`] (RFC 6121), [`disco`] (XEP-0030), [`caps`]
//!   (XEP-0115), [`ping`] (XEP-0199), [`version`] (XEP-0092), [`last`] (XEP-0012), [`offline`]
//!   (XEP-0160), [`carbons`] (XEP-0280), [`mam`] (XEP-0313, with XEP-0359 and XEP-0334), [`push`]
//!   (XEP-0357, with its durable notification queue).

pub mod datetime;
pub mod host;
pub mod ns;
pub mod rate;
pub mod registry;
pub mod stanza;
#[cfg(test)]
pub mod testing;

pub mod caps;
pub mod carbons;
pub mod csi;
pub mod disco;
pub mod last;
pub mod mam;
pub mod offline;
pub mod ping;
pub mod presence;
pub mod push;
pub mod roster;
pub mod sm;
pub mod version;

pub use host::Host;
pub use registry::Registry;
pub use stanza::{Kind, Stanza, StanzaError};

/// Registers every module that ships with Halyard, in the order their hooks should see stanzas
/// when priorities tie.
pub fn register_all(reg: &mut Registry) {
    mam::register(reg);
    roster::register(reg);
    presence::register(reg);
    offline::register(reg);
    carbons::register(reg);
    sm::register(reg);
    csi::register(reg);
    disco::register(reg);
    caps::register(reg);
    ping::register(reg);
    version::register(reg);
    last::register(reg);
    push::register(reg);
}
