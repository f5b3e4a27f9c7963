//! TLS in one place: the process-wide rustls crypto provider, the server side (the consent
//! listener's certificate) and the client side (the roots trusted for Talkdesk: the built-in
//! ones and `egress.ca_file`'s).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::files::{read_text, FileKind};

/// Installs rustls' process-wide crypto provider (ring) once; later calls are no-ops. Both
/// the server and the client side call it before building a configuration.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why the consent listener's certificate or key could not be loaded; each names its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: {problem}")]
    Read { key: &'static str, problem: String },
    #[error("server.tls_cert_file {}: cannot read a certificate chain", .path.display())]
    Certificates {
        path: PathBuf,
        #[source]
        source: PemError,
    },
    #[error("server.tls_cert_file {}: no certificate found", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("server.tls_key_file {}: cannot read a private key", .path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: PemError,
    },
    #[error(
        "server.tls_key_file {} does not fit server.tls_cert_file {}",
        .key.display(),
        .cert.display()
    )]
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Loads a PEM certificate chain and key into a TLS acceptor offering h2 and http/1.1.
/// Both files are read through the configuration's bounded read (the key as a secret).
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    install_crypto_provider();
    let read = |key, path, kind| {
        read_text(path, kind)
            .map(|read| read.text)
            .map_err(|problem| TlsError::Read { key, problem })
    };
    let cert_pem = read("server.tls_cert_file", cert_file, FileKind::Certificates)?;
    let key_pem = read("server.tls_key_file", key_file, FileKind::Secret)?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Certificates {
            path: cert_file.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Key {
            path: key_file.to_owned(),
            source,
        })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Mismatch {
            key: key_file.to_owned(),
            cert: cert_file.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client configuration trusting the webpki roots (what Talkdesk's certificates chain to)
/// and `extra_roots` (`egress.ca_file`: a corporate CA that inspects TLS), validated already.
pub fn client_config(extra_roots: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(extra_roots.iter().cloned());
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener reads its files again when it starts (they may have changed since the
    /// configuration was checked): through the same bounded read.
    #[test]
    fn the_listener_reads_its_files_within_their_bounds() {
        let dir = std::env::temp_dir().join(format!("consent-proxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let huge = dir.join("huge.pem");
        std::fs::write(&huge, "-".repeat(2 << 20)).unwrap();
        let small = dir.join("small.pem");
        std::fs::write(&small, "not yet parsed").unwrap();
        let zero = Path::new("/dev/zero");
        for (cert, key, expected) in [
            (
                small.as_path(),
                huge.as_path(),
                format!(
                    "server.tls_key_file: '{}' is larger than 64 KiB",
                    huge.display()
                ),
            ),
            (
                huge.as_path(),
                zero,
                format!(
                    "server.tls_cert_file: '{}' is larger than 1 MiB",
                    huge.display()
                ),
            ),
            (
                zero,
                zero,
                "server.tls_cert_file: '/dev/zero' is not a regular file".to_owned(),
            ),
        ] {
            match tls_acceptor(cert, key) {
                Err(error) => assert_eq!(error.to_string(), expected),
                Ok(_) => panic!("accepted {}", cert.display()),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
