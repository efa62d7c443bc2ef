//! Mutual TLS for migration traffic (rustls, ring provider): each side presents a
//! certificate from files (the Secret an operator mounts) and accepts only a peer whose
//! certificate the given CA signed, as KubeVirt protects its migration traffic.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::Connection;

/// Where the certificate, its key and the CA come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This podvm's certificate chain (PEM), used as server and as client.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that signs every podvm's migration certificate (PEM).
    pub ca: PathBuf,
    /// The name the destination's certificate must carry (DNS name or IP address); by
    /// default the host of the migration address (`localhost` for a unix socket).
    pub server_name: Option<String>,
}

/// The TLS setup could not be made from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {why}")]
    File {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--migration-tls-server-name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    #[error("the migration TLS configuration was refused: {0}")]
    Config(String),
}

/// Client and server configurations, built once at start so bad files fail early.
#[derive(Clone)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn file_err(flag: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        flag,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(flag, path, e))?;
    if certs.is_empty() {
        return Err(file_err(flag, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

impl Tls {
    /// Loads and checks the files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = certs("--migration-tls-cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            file_err(
                "--migration-tls-key",
                &files.key,
                format!("no usable PEM private key ({e})"),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certs("--migration-tls-ca", &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| file_err("--migration-tls-ca", &files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| file_err("--migration-tls-key", &files.key, e))?;
        // One connection per migration: nothing to resume, so no session tickets either.
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| file_err("--migration-tls-key", &files.key, e))?;
        let server_name = files
            .server_name
            .as_ref()
            .map(|n| ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone())))
            .transpose()?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
        })
    }

    /// The source's side: TLS over `sock` to a destination called `host` (unless a server
    /// name was given), handshake done (so a refused certificate fails here, with rustls'
    /// reason).
    pub fn connect<S: Read + Write + Send + 'static>(
        &self,
        mut sock: S,
        host: &str,
    ) -> std::io::Result<Box<dyn Connection>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                .map_err(|_| {
                    std::io::Error::other(format!(
                        "{host:?} cannot be checked against a certificate; give --migration-tls-server-name"
                    ))
                })?,
        };
        let mut conn =
            ClientConnection::new(self.client.clone(), name).map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Box::new(rustls::StreamOwned::new(conn, sock)))
    }

    /// The destination's side.
    pub fn accept<S: Read + Write + Send + 'static>(
        &self,
        mut sock: S,
    ) -> std::io::Result<Box<dyn Connection>> {
        let mut conn = ServerConnection::new(self.server.clone()).map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Box::new(rustls::StreamOwned::new(conn, sock)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("podvm-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self { dir }
        }

        /// A CA and a `localhost` certificate it signed; the files for them.
        fn issue(&self, name: &str) -> TlsFiles {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let write = |file: &str, text: String| {
                let p = self.dir.join(format!("{name}-{file}"));
                std::fs::write(&p, text).unwrap();
                p
            };
            TlsFiles {
                cert: write("cert.pem", cert.pem()),
                key: write("key.pem", key.serialize_pem()),
                ca: write("ca.pem", ca.pem()),
                server_name: None,
            }
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Runs a handshake between a source with `client` and a destination with `server`,
    /// then sends a few bytes; the result of each side.
    fn exchange(client: &Tls, server: &Tls) -> (std::io::Result<()>, std::io::Result<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = server.clone();
        let dst = std::thread::spawn(move || {
            let mut conn = server.accept(b)?;
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf)?;
            assert_eq!(&buf, b"hello");
            Ok(())
        });
        let src = client.connect(a, "localhost").and_then(|mut conn| {
            conn.write_all(b"hello")?;
            conn.flush()
        });
        (src, dst.join().unwrap())
    }

    #[test]
    fn migration_tls_handshakes_with_the_same_ca_and_refuses_another() {
        let pki = Pki::new("handshake");
        let good_files = pki.issue("good");
        let good = Tls::load(&good_files).unwrap();
        let (src, dst) = exchange(&good, &good);
        src.unwrap();
        dst.unwrap();

        // A destination that trusts another CA refuses the source's certificate.
        let mut picky_files = good_files.clone();
        picky_files.ca = pki.issue("other").ca;
        let picky = Tls::load(&picky_files).unwrap();
        let (_, dst) = exchange(&good, &picky);
        let e = dst.unwrap_err().to_string();
        assert!(e.contains("certificate"), "{e}");

        // A destination whose certificate does not name the host is refused by the source.
        let mut named = pki.issue("named");
        named.server_name = Some("podvm-b.example".into());
        let named = Tls::load(&named).unwrap();
        let (src, _) = exchange(&named, &good);
        assert!(src.is_err());
    }

    #[test]
    fn migration_tls_bad_files_name_the_flag() {
        let pki = Pki::new("files");
        let good = pki.issue("good");
        let check = |files: TlsFiles, flag: &str| {
            let e = Tls::load(&files).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        };
        let mut f = good.clone();
        f.cert = pki.dir.join("missing.pem");
        check(f, "--migration-tls-cert");
        let mut f = good.clone();
        f.key = good.cert.clone();
        check(f, "--migration-tls-key");
        let mut f = good.clone();
        f.ca = good.key.clone();
        check(f, "--migration-tls-ca");
        let mut f = good.clone();
        f.server_name = Some("not a name!".into());
        check(f, "--migration-tls-server-name");
    }
}
