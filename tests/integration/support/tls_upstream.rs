//! An HTTPS stand-in for Talkdesk and the PKI it needs, made at test time (rcgen): a CA, a
//! server certificate for `localhost` and 127.0.0.1, and a fake token endpoint and consent API
//! that records what it saw. Used by the TLS tests and the egress (corporate proxy) tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// Test PKI

/// A CA and a server certificate for `localhost` and 127.0.0.1, as PEM files in a temporary
/// directory (removed on drop).
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: CertificateDer<'static>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA certificate alone, as PEM.
    pub ca_file: PathBuf,
    /// A key that does not belong to the certificate.
    pub other_key_pem: String,
    pub cert_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "consent-proxy test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");

        let cert_file = dir.join("server.crt");
        let key_file = dir.join("server.key");
        // The chain as servers usually hold it: leaf, then the CA.
        let cert_pem = server_cert.pem();
        std::fs::write(&cert_file, format!("{cert_pem}{}", ca_cert.pem())).expect("write cert");
        std::fs::write(&key_file, server_key.serialize_pem()).expect("write key");
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write CA");
        TestPki {
            dir,
            ca: ca_cert.der().clone(),
            cert_file,
            key_file,
            ca_file,
            other_key_pem: KeyPair::generate().expect("other key").serialize_pem(),
            cert_pem,
        }
    }

    /// A file in the PKI's directory with this content.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }

    /// A rustls client configuration trusting only the test CA (no ALPN set).
    pub fn client_config(&self) -> rustls::ClientConfig {
        consent_proxy::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA accepted");
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    pub fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        consent_proxy::tls::install_crypto_provider();
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.key_file).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream over HTTP/2

/// What the fake consent API saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub version: Version,
    pub authorization: Option<String>,
}

/// An HTTPS fake of Talkdesk (token endpoint and consent API) that records the HTTP version
/// of each request.
pub struct FakeTalkdesk {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

pub const FAKE_TOKEN: &str = "fake-upstream-token-0123456789";

impl FakeTalkdesk {
    pub async fn start(pki: &TestPki, alpn: &[&[u8]]) -> FakeTalkdesk {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config(alpn)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = service_fn(move |request: Request<Incoming>| {
                            let seen = seen.clone();
                            async move { Ok::<_, Infallible>(fake_answer(request, &seen).await) }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            })
        };
        FakeTalkdesk { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeTalkdesk {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_answer(request: Request<Incoming>, seen: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        version: parts.version,
        authorization: parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let json = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/oauth/token") => json(
            StatusCode::OK,
            format!(r#"{{"access_token":"{FAKE_TOKEN}","token_type":"Bearer","expires_in":600}}"#),
        ),
        (&Method::GET, _) => json(StatusCode::OK, r#"{"status":"REFUSED"}"#.to_owned()),
        (&Method::PUT, _) => json(StatusCode::OK, String::from_utf8_lossy(&body).into_owned()),
        _ => json(StatusCode::NOT_FOUND, "{}".to_owned()),
    }
}
