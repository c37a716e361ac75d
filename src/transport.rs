//! How a destination is reached beyond its URL, from its entry in the
//! rules: HTTP/2, and TLS files of its own (a private CA, a client
//! certificate for mutual TLS). Read and checked when the rules load, so
//! that `hookgate check` and a reload report a bad file, not the first
//! delivery.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_platform_verifier::BuilderVerifierExt;

/// How a destination is reached, beyond its URL.
#[derive(Clone, Default)]
pub struct Transport {
    http2: bool,
    /// A TLS configuration of the destination's own (its CA, its client
    /// certificate); the platform's trust store without one.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Tells transports apart in the pool: a connection is reused only by
    /// requests that would have made the same one.
    id: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("http2", &self.http2)
            .field("own_tls", &self.tls.is_some())
            .finish()
    }
}

/// A destination's own TLS files, as named in the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trusted instead of the platform's store.
    pub ca_file: Option<PathBuf>,
    /// For mutual TLS, with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// Why a destination's TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("client_cert_file and client_key_file go together")]
    HalfClientAuth,
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

impl Transport {
    /// Reads and checks the files now, so that a reload or `hookgate
    /// check` reports them, not the first delivery.
    pub fn new(http2: bool, files: Option<&TlsFiles>) -> Result<Self, TransportError> {
        let mut id = std::collections::hash_map::DefaultHasher::new();
        http2.hash(&mut id);
        let tls = match files {
            None => None,
            Some(files) => Some(Arc::new(tls_config(files, http2, &mut id)?)),
        };
        Ok(Self {
            http2,
            tls,
            id: id.finish(),
        })
    }

    pub fn http2(&self) -> bool {
        self.http2
    }

    /// The destination's own TLS configuration, if it has TLS files.
    pub fn tls(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.as_ref()
    }

    pub fn id(&self) -> u64 {
        self.id
    }
}

fn read_file(path: &Path, id: &mut impl Hasher) -> Result<Vec<u8>, TransportError> {
    let bytes = std::fs::read(path).map_err(|e| TransportError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    bytes.hash(id);
    Ok(bytes)
}

fn tls_config(
    files: &TlsFiles,
    http2: bool,
    id: &mut impl Hasher,
) -> Result<rustls::ClientConfig, TransportError> {
    install_provider();
    let bad = |path: &Path, message: String| TransportError::File {
        path: path.to_owned(),
        message,
    };
    let builder = rustls::ClientConfig::builder();
    let builder = match &files.ca_file {
        Some(path) => {
            let pem = read_file(path, id)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(path, format!("not a PEM certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(path, "holds no certificate".into()));
            }
            builder.with_root_certificates(roots)
        }
        None => builder.with_platform_verifier()?,
    };
    let mut config = match (&files.client_cert_file, &files.client_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let pem = read_file(cert, id)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(cert, format!("not a PEM certificate: {e}")))?;
            if certs.is_empty() {
                return Err(bad(cert, "holds no certificate".into()));
            }
            let key_pem = read_file(key, id)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
            builder.with_client_auth_cert(certs, key_der)?
        }
        _ => return Err(TransportError::HalfClientAuth),
    };
    config.alpn_protocols = alpn(http2);
    Ok(config)
}

pub fn alpn(http2: bool) -> Vec<Vec<u8>> {
    if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    }
}

/// rustls is built with ring only (small, quick to build), installed as
/// the process's provider before any TLS configuration is made.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_checked_when_read() {
        let dir = tempfile_dir();
        let missing = TlsFiles {
            ca_file: Some(dir.join("nope.pem")),
            ..TlsFiles::default()
        };
        assert!(matches!(
            Transport::new(false, Some(&missing)),
            Err(TransportError::File { .. })
        ));
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let empty = TlsFiles {
            ca_file: Some(dir.join("empty.pem")),
            ..TlsFiles::default()
        };
        let err = Transport::new(false, Some(&empty))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no certificate"), "{err}");
        let half = TlsFiles {
            client_cert_file: Some(dir.join("empty.pem")),
            ..TlsFiles::default()
        };
        assert!(matches!(
            Transport::new(false, Some(&half)),
            Err(TransportError::HalfClientAuth)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hookgate-transport-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
