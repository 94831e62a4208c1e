//! The TLS settings of the client's connector.
//!
//! Only `--cacert` or the system's roots are trusted, never both: a pinned
//! CA means the user wants that CA alone. A plain-http client still needs a
//! configuration for the connector's type, but it never handshakes, so it
//! gets an empty one and the system's roots are not read for it.

use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// The TLS settings of an https client: the CA of `--cacert` only, else the
/// system's roots.
pub(super) fn tls_config(cacert: Option<&Path>) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow!("cannot read --cacert {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| {
                    anyhow!("--cacert {}: not a PEM certificate: {e}", path.display())
                })?;
                roots.add(cert).map_err(|e| {
                    anyhow!("--cacert {}: unusable certificate: {e}", path.display())
                })?;
            }
            if roots.is_empty() {
                bail!(
                    "--cacert {}: no certificate found (expected -----BEGIN CERTIFICATE-----)",
                    path.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A TLS configuration for plain-http clients: never used for a handshake.
pub(super) fn tls_config_empty() -> Result<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}
