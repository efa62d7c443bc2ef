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
    /// A secret shared by the two sides of this VM's migrations only (an operator mounts the
    /// same per-VM Secret into both pods): the source proves it holds it, bound to this TLS
    /// session, and a destination given one takes no source that cannot.
    pub token: Option<PathBuf>,
}

/// What a TLS session's two ends share and no one else can know: 32 bytes of its keying
/// material (RFC 5705/8446 exporter), so a proof made for one session is worth nothing in
/// another.
pub type Binding = [u8; 32];

const EXPORTER_LABEL: &[u8] = b"EXPORTER-podvm-migration-token";
/// The shortest token worth the name, and the longest podvm reads.
const TOKEN_MIN: usize = 16;
const TOKEN_MAX: usize = 4096;

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
    /// The key of `--migration-token-file`'s proofs.
    token: Option<ring::hmac::Key>,
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
        let token = files.token.as_deref().map(load_token).transpose()?;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name,
            token,
        })
    }

    /// The source's proof that it holds the token, for the session `binding` (hex), if it
    /// has a token.
    pub fn prove(&self, binding: &Binding) -> Option<String> {
        let key = self.token.as_ref()?;
        let tag = ring::hmac::sign(key, binding);
        Some(tag.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The destination's check of a source's `proof` for the session `binding`: always
    /// passes without a token of its own; with one, only the proof made with the same token
    /// for this session does (compared in constant time).
    pub fn verify(&self, binding: &Binding, proof: Option<&str>) -> Result<(), String> {
        let Some(key) = &self.token else {
            return Ok(());
        };
        let refused = || {
            "the source did not prove it holds this VM's migration token (--migration-token-file)"
                .to_string()
        };
        let proof = proof.ok_or_else(refused)?;
        let bytes = (0..proof.len())
            .step_by(2)
            .map(|i| {
                proof
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(refused)?;
        ring::hmac::verify(key, binding, &bytes).map_err(|_| refused())
    }

    /// The source's side: TLS over `sock` to a destination called `host` (unless a server
    /// name was given), handshake done (so a refused certificate fails here, with rustls'
    /// reason).
    pub fn connect<S: Read + Write + Send + 'static>(
        &self,
        mut sock: S,
        host: &str,
    ) -> std::io::Result<(Box<dyn Connection>, Binding)> {
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
        let binding = binding(&conn)?;
        Ok((Box::new(rustls::StreamOwned::new(conn, sock)), binding))
    }

    /// The destination's side.
    pub fn accept<S: Read + Write + Send + 'static>(
        &self,
        mut sock: S,
    ) -> std::io::Result<(Box<dyn Connection>, Binding)> {
        let mut conn = ServerConnection::new(self.server.clone()).map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        let binding = binding(&conn)?;
        Ok((Box::new(rustls::StreamOwned::new(conn, sock)), binding))
    }
}

/// The session's [`Binding`].
fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> std::io::Result<Binding> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(std::io::Error::other)
}

/// Reads `--migration-token-file`: 16 to 4096 bytes (a trailing newline is not part of it).
fn load_token(path: &Path) -> Result<ring::hmac::Key, TlsError> {
    let flag = "--migration-token-file";
    let file = std::fs::File::open(path).map_err(|e| file_err(flag, path, e))?;
    let mut bytes = Vec::new();
    file.take(TOKEN_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_err(flag, path, e))?;
    if bytes.len() > TOKEN_MAX {
        return Err(file_err(
            flag,
            path,
            format!("longer than {TOKEN_MAX} bytes"),
        ));
    }
    while bytes.last() == Some(&b'\n') || bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    if bytes.len() < TOKEN_MIN {
        return Err(file_err(
            flag,
            path,
            format!("shorter than {TOKEN_MIN} bytes: use a random secret, e.g. `head -c 32 /dev/urandom | base64`"),
        ));
    }
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes))
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
                token: None,
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
            let (mut conn, _) = server.accept(b)?;
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf)?;
            assert_eq!(&buf, b"hello");
            Ok(())
        });
        let src = client.connect(a, "localhost").and_then(|(mut conn, _)| {
            conn.write_all(b"hello")?;
            conn.flush()
        });
        (src, dst.join().unwrap())
    }

    /// Handshakes a source with `client` and a destination with `server`; both sides'
    /// session bindings.
    fn bindings(client: &Tls, server: &Tls) -> (Binding, Binding) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = server.clone();
        let dst = std::thread::spawn(move || server.accept(b).map(|(_, binding)| binding));
        let (_, src) = client.connect(a, "localhost").unwrap();
        (src, dst.join().unwrap().unwrap())
    }

    #[test]
    fn migration_token_proof_is_bound_to_the_token_and_the_session() {
        let pki = Pki::new("token");
        let mut files = pki.issue("vm");
        let token = |name: &str, text: &str| {
            let path = pki.dir.join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let plain = Tls::load(&files).unwrap();
        files.token = token("a", "0123456789abcdef-vm-a\n");
        let a = Tls::load(&files).unwrap();
        files.token = token("b", "0123456789abcdef-vm-b\n");
        let b = Tls::load(&files).unwrap();

        let (src, dst) = bindings(&a, &a);
        assert_eq!(src, dst, "both ends derive the same binding");
        let proof = a.prove(&src);
        assert!(a.verify(&dst, proof.as_deref()).is_ok());
        // Another VM's token, no proof, or a proof made for another session: refused.
        let e = b.verify(&dst, proof.as_deref()).unwrap_err();
        assert!(e.contains("--migration-token-file"), "{e}");
        assert!(a.verify(&dst, None).is_err());
        let (_, other_session) = bindings(&a, &a);
        assert_ne!(other_session, dst);
        assert!(a.verify(&other_session, proof.as_deref()).is_err());
        assert!(a.verify(&dst, Some("zz")).is_err());
        // A destination without a token takes any source; a source without one proves nothing.
        assert!(plain.verify(&dst, None).is_ok());
        assert_eq!(plain.prove(&src), None);
    }

    #[test]
    fn migration_token_file_must_be_a_real_secret() {
        let pki = Pki::new("token-file");
        let mut files = pki.issue("vm");
        let short = pki.dir.join("short");
        std::fs::write(&short, "secret\n").unwrap();
        files.token = Some(short);
        let e = Tls::load(&files).unwrap_err().to_string();
        assert!(
            e.contains("--migration-token-file") && e.contains("shorter"),
            "{e}"
        );
        let long = pki.dir.join("long");
        std::fs::write(&long, vec![b'x'; 5000]).unwrap();
        files.token = Some(long);
        assert!(Tls::load(&files)
            .unwrap_err()
            .to_string()
            .contains("longer"));
        files.token = Some(pki.dir.join("missing"));
        assert!(Tls::load(&files).is_err());
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
