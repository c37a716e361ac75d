//! Integration tests: the real gateway on 127.0.0.1 against real
//! downstream HTTP servers, observed through its answers and `/metrics`.

mod cli;
mod destinations;
mod durable;
mod faults;
mod follow;
mod hardening;
mod ingress;
mod nats;
mod observability;
mod properties;
mod protocol;
mod reload;
mod routing;
mod shutdown;
mod support;
