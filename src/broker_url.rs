//! A broker's URL, as RabbitMQ's URI specification and its "URI Query Parameters" guide
//! describe it: `amqp://user:password@host:port/vhost?heartbeat=5`, or `amqps://` for TLS.
//!
//! amiquip's own URL parser is private, and ignores the query; here every part is read, and a
//! query parameter this crate does not know, or a value it cannot read, is an error that names
//! it, never ignored. No message shows the URL's password.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use crate::error::{Error, Result};

/// The parts of an `amqp://` or `amqps://` URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BrokerAddress {
    /// True for `amqps://`.
    pub(crate) tls: bool,
    /// Host name or IP address.
    pub(crate) host: String,
    /// TCP port; 5672 by default, 5671 for `amqps://`.
    pub(crate) port: u16,
    /// Virtual host, percent-decoded; `/` when the URL has no path.
    pub(crate) vhost: String,
    /// User name; `guest` by default.
    pub(crate) username: String,
    /// Password; `guest` by default.
    pub(crate) password: String,
    /// What the URL's query says.
    pub(crate) params: UrlParams,
}

/// The query parameters of a broker URL, as RabbitMQ's "URI Query Parameters" guide lists
/// them (and `frame_max`, which the Erlang client also takes). Each is `None` when the URL
/// does not say; what it says wins over [`crate::ConnectOptions`] (and the binaries' flags)
/// for connections to that broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct UrlParams {
    /// `heartbeat`: seconds; 0 turns heartbeats off.
    pub(crate) heartbeat: Option<u16>,
    /// `connection_timeout`: milliseconds.
    pub(crate) connection_timeout: Option<Duration>,
    /// `channel_max`: the most channels on the connection.
    pub(crate) channel_max: Option<u16>,
    /// `frame_max`: the largest frame, in bytes.
    pub(crate) frame_max: Option<u32>,
    /// `auth_mechanism`: true for `external`, false for `plain`; the first this crate speaks
    /// of those given.
    pub(crate) external_auth: Option<bool>,
    /// `cacertfile`, `certfile`, `keyfile`: PEM files (the key in PKCS#8 form).
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    /// `verify`: true for `verify_peer` (the default), false for `verify_none`, which
    /// accepts any certificate for any name.
    pub(crate) verify_peer: Option<bool>,
    /// `server_name_indication`: the name the broker's certificate must carry and that TLS
    /// sends (SNI), instead of the URL's host; `disable` sends none and checks no name.
    pub(crate) server_name: Option<ServerName>,
}

/// What `server_name_indication` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerName {
    /// Send this name, and check the broker's certificate against it.
    Name(String),
    /// Send no name, and check none.
    Disabled,
}

/// The query parameters a URL may carry, for messages.
const KNOWN_PARAMS: &str = "heartbeat, connection_timeout, channel_max, frame_max, \
                            auth_mechanism, cacertfile, certfile, keyfile, verify, \
                            server_name_indication";

impl UrlParams {
    /// Reads the query of a URL; `tls` says whether it is `amqps://`.
    ///
    /// # Errors
    ///
    /// The reason, naming the parameter, for one this crate does not know, one given twice,
    /// a value it cannot read, or a TLS parameter on an `amqp://` URL.
    fn parse(
        query: url::form_urlencoded::Parse<'_>,
        tls: bool,
    ) -> std::result::Result<Self, String> {
        let mut params = UrlParams::default();
        let mut mechanisms = Vec::new();
        for (name, value) in query {
            let number = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("query parameter {name}={value:?} is not {what}"))
            };
            let twice = || format!("query parameter {name} is given twice");
            let is_tls = matches!(
                &*name,
                "cacertfile" | "certfile" | "keyfile" | "verify" | "server_name_indication"
            );
            if is_tls && !tls {
                return Err(format!(
                    "query parameter {name} is for amqps:// URLs only (this one is amqp://)"
                ));
            }
            let path = || PathBuf::from(value.as_ref());
            match &*name {
                "heartbeat" => {
                    let seconds = u16::try_from(number("a number of seconds")?)
                        .map_err(|_| format!("query parameter heartbeat={value} is too large"))?;
                    set(&mut params.heartbeat, seconds, twice)?;
                }
                "connection_timeout" => {
                    let millis = number("a number of milliseconds")?;
                    set(
                        &mut params.connection_timeout,
                        Duration::from_millis(millis),
                        twice,
                    )?;
                }
                "channel_max" => {
                    let channels = u16::try_from(number("a number of channels")?)
                        .map_err(|_| format!("query parameter channel_max={value} is too large"))?;
                    set(&mut params.channel_max, channels, twice)?;
                }
                "frame_max" => {
                    let bytes = u32::try_from(number("a number of bytes")?)
                        .map_err(|_| format!("query parameter frame_max={value} is too large"))?;
                    if bytes != 0 && bytes < 4096 {
                        return Err(format!(
                            "query parameter frame_max={value} is below AMQP's least, 4096"
                        ));
                    }
                    set(&mut params.frame_max, bytes, twice)?;
                }
                "auth_mechanism" => mechanisms.push(value.to_ascii_lowercase()),
                "cacertfile" => set(&mut params.ca_file, path(), twice)?,
                "certfile" => set(&mut params.cert_file, path(), twice)?,
                "keyfile" => set(&mut params.key_file, path(), twice)?,
                "verify" => {
                    let peer = match &*value {
                        "verify_peer" => true,
                        "verify_none" => false,
                        _ => {
                            return Err(format!(
                                "query parameter verify={value:?} is not verify_peer or \
                                 verify_none"
                            ));
                        }
                    };
                    set(&mut params.verify_peer, peer, twice)?;
                }
                "server_name_indication" => {
                    let name = match &*value {
                        "" => return Err("query parameter server_name_indication is empty".into()),
                        "disable" => ServerName::Disabled,
                        host => ServerName::Name(host.to_string()),
                    };
                    set(&mut params.server_name, name, twice)?;
                }
                "password" | "depth" | "fail_if_no_peer_cert" => {
                    return Err(format!(
                        "query parameter {name} is not supported by this client (it takes \
                         {KNOWN_PARAMS})"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unknown query parameter '{name}' (RabbitMQ's are {KNOWN_PARAMS})"
                    ));
                }
            }
        }
        if !mechanisms.is_empty() {
            let known = mechanisms
                .iter()
                .find(|mechanism| matches!(mechanism.as_str(), "plain" | "external"));
            let Some(mechanism) = known else {
                return Err(format!(
                    "query parameter auth_mechanism names none this client speaks \
                     ({}; it speaks plain and external)",
                    mechanisms.join(", ")
                ));
            };
            if mechanism == "external" && !tls {
                return Err("auth_mechanism=external needs an amqps:// URL".into());
            }
            params.external_auth = Some(mechanism == "external");
        }
        Ok(params)
    }
}

/// Sets `slot` to `value`, unless it is set already.
fn set<T>(
    slot: &mut Option<T>,
    value: T,
    twice: impl Fn() -> String,
) -> std::result::Result<(), String> {
    if slot.is_some() {
        return Err(twice());
    }
    *slot = Some(value);
    Ok(())
}

impl BrokerAddress {
    /// Parses a URL as the RabbitMQ URI specification describes it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the URL is malformed, its scheme is not `amqp` or `amqps`, it has
    /// no host, its path has more than one segment, or its query a parameter this crate does
    /// not know or cannot read (see [`UrlParams`]).
    pub(crate) fn parse(url: &str) -> Result<BrokerAddress> {
        let bad =
            |why: &str| Error::Config(format!("bad broker URL '{}': {why}", without_password(url)));
        let parsed = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(bad(&format!("scheme '{other}' is not amqp or amqps"))),
        };
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host.trim_matches(['[', ']']).to_string(),
            _ => return Err(bad("no host")),
        };
        let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
        let path = parsed.path().strip_prefix('/').unwrap_or("");
        if path.contains('/') {
            return Err(bad("the vhost must be one path segment (write '/' as %2f)"));
        }
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            decode(path).map_err(|_| bad("the vhost is not valid percent-encoded UTF-8"))?
        };
        let username = match parsed.username() {
            "" => "guest".to_string(),
            name => decode(name).map_err(|_| bad("the user name is not valid UTF-8"))?,
        };
        let password = match parsed.password() {
            None => "guest".to_string(),
            Some(word) => decode(word).map_err(|_| bad("the password is not valid UTF-8"))?,
        };
        let params = UrlParams::parse(parsed.query_pairs(), tls).map_err(|why| bad(&why))?;
        Ok(BrokerAddress {
            tls,
            host,
            port,
            vhost,
            username,
            password,
            params,
        })
    }
}

fn decode(text: &str) -> std::result::Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
}

/// `url` with its password, if it has one, replaced by `***`, and the value of a `password`
/// query parameter (a key file's, for the Erlang client) too; works on malformed URLs too, so
/// that no error message ever shows a password.
pub(crate) fn without_password(url: &str) -> String {
    let shown = without_user_password(url);
    let Some(query) = shown.find('?') else {
        return shown;
    };
    let mut masked = shown[..=query].to_string();
    let (query, fragment) = match shown[query + 1..].split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (&shown[query + 1..], None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name == "password" => format!("{name}=***"),
            _ => pair.to_string(),
        })
        .collect();
    masked.push_str(&pairs.join("&"));
    if let Some(fragment) = fragment {
        masked.push('#');
        masked.push_str(fragment);
    }
    masked
}

fn without_user_password(url: &str) -> String {
    let Some(start) = url.find("://").map(|scheme_end| scheme_end + 3) else {
        return url.to_string();
    };
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |end| start + end);
    let Some(at) = url[start..authority_end].rfind('@').map(|at| start + at) else {
        return url.to_string();
    };
    match url[start..at].find(':') {
        Some(colon) => format!("{}***{}", &url[..start + colon + 1], &url[at..]),
        None => url.to_string(),
    }
}

/// Shows the address without its password.
impl std::fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&url_for_display(self))
    }
}

/// The URL without its password, for messages and logs.
pub(crate) fn url_for_display(address: &BrokerAddress) -> String {
    format!(
        "{}://{}@{}:{}",
        if address.tls { "amqps" } else { "amqp" },
        address.username,
        address.host,
        address.port
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_parses_to_local_guest_on_root_vhost() {
        let address = BrokerAddress::parse(crate::DEFAULT_URL).unwrap();
        assert_eq!(
            address,
            BrokerAddress {
                tls: false,
                host: "127.0.0.1".into(),
                port: 5672,
                vhost: "/".into(),
                username: "guest".into(),
                password: "guest".into(),
                params: UrlParams::default(),
            }
        );
    }

    #[test]
    fn defaults_fill_what_the_url_leaves_out() {
        let address = BrokerAddress::parse("amqps://broker.example").unwrap();
        assert!(address.tls);
        assert_eq!(address.port, 5671);
        assert_eq!(address.vhost, "/");
        assert_eq!(address.username, "guest");
        assert_eq!(address.password, "guest");
    }

    #[test]
    fn vhost_and_credentials_are_percent_decoded() {
        let address = BrokerAddress::parse("amqp://us%40er:p%3Ass+@h:1234/my%2Fvhost").unwrap();
        assert_eq!(address.username, "us@er");
        assert_eq!(address.password, "p:ss+");
        assert_eq!(address.vhost, "my/vhost");
        assert_eq!(address.port, 1234);
    }

    #[test]
    fn passwords_never_show_in_urls_for_messages() {
        assert_eq!(
            without_password("amqp://user:s3cret@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
        assert_eq!(without_password("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(without_password("amqp://host/"), "amqp://host/");
        assert_eq!(without_password("amqp://u:p@ss@h/v"), "amqp://u:***@h/v");
        assert_eq!(without_password("not a url"), "not a url");
        assert_eq!(
            without_password("amqps://u:pw@h/?certfile=c&password=s3cret#x"),
            "amqps://u:***@h/?certfile=c&password=***#x"
        );
        for url in [
            "amqp://u:s3cret@h:99999/",
            "http://u:s3cret@h/",
            "amqp://u:s3cret@/x/y",
        ] {
            let error = BrokerAddress::parse(url).unwrap_err().to_string();
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn query_parameters_are_read_and_unknown_ones_refused_by_name() {
        let address = BrokerAddress::parse(
            "amqps://h/%2f?heartbeat=7&connection_timeout=2500&channel_max=9&frame_max=8192\
             &auth_mechanism=amqplain&auth_mechanism=external&cacertfile=/ca.pem\
             &certfile=/c.pem&keyfile=/k.pem&verify=verify_none&server_name_indication=broker",
        )
        .unwrap();
        let params = address.params;
        assert_eq!(params.heartbeat, Some(7));
        assert_eq!(params.connection_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(
            (params.channel_max, params.frame_max),
            (Some(9), Some(8192))
        );
        assert_eq!(params.external_auth, Some(true));
        assert_eq!(params.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(params.key_file, Some(PathBuf::from("/k.pem")));
        assert_eq!(params.verify_peer, Some(false));
        assert_eq!(params.server_name, Some(ServerName::Name("broker".into())));
        let disabled = BrokerAddress::parse("amqps://h?server_name_indication=disable").unwrap();
        assert_eq!(disabled.params.server_name, Some(ServerName::Disabled));
        assert_eq!(
            BrokerAddress::parse("amqp://h/").unwrap().params,
            UrlParams::default()
        );

        for (url, expected) in [
            (
                "amqp://u:s3cret@h/?hearbeat=7",
                "unknown query parameter 'hearbeat'",
            ),
            (
                "amqp://h/?heartbeat=soon",
                "heartbeat=\"soon\" is not a number",
            ),
            ("amqp://h/?heartbeat=70000", "too large"),
            ("amqp://h/?heartbeat=1&heartbeat=2", "given twice"),
            ("amqp://h/?frame_max=100", "below AMQP's least"),
            ("amqp://h/?cacertfile=/ca.pem", "for amqps:// URLs only"),
            ("amqps://h/?verify=maybe", "not verify_peer or verify_none"),
            (
                "amqps://h/?auth_mechanism=amqplain",
                "names none this client speaks",
            ),
            ("amqp://h/?auth_mechanism=external", "needs an amqps:// URL"),
            ("amqps://h/?password=s3cret", "not supported"),
        ] {
            let error = BrokerAddress::parse(url).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, Error::Config(_)), "{url}: {message}");
            assert!(message.contains(expected), "{url}: {message}");
            assert!(!message.contains("s3cret"), "{url}: {message}");
        }
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in ["http://h/", "amqp://h/a/b", "not a url", "amqp:///vhost"] {
            let error = BrokerAddress::parse(url).unwrap_err();
            assert!(matches!(error, Error::Config(_)), "{url}: {error}");
        }
    }
}
