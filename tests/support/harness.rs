//! The usual test set-up: a capture backend and the real `ivrguard` binary
//! in front of it.

use rand::Rng;

use super::backend::{Backend, Behaviour};
use super::proxy::{Proxy, ProxyConfig};

pub struct Harness {
    pub backend: Backend,
    pub proxy: Proxy,
}

/// A backend behaving as `behaviour` and a proxy in front of it, with the
/// default test config changed by `tweak`.
pub async fn harness(behaviour: Behaviour, tweak: impl FnOnce(&mut ProxyConfig)) -> Harness {
    let backend = Backend::start(behaviour).await;
    let mut config = ProxyConfig::new(backend.url());
    tweak(&mut config);
    let proxy = Proxy::start(&config).await;
    Harness { backend, proxy }
}

/// A Twilio-style SID (`CA…`, `AC…`) with 32 random hex digits.
pub fn random_sid(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        hex::encode(rand::thread_rng().gen::<[u8; 16]>())
    )
}
