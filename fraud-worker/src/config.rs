//! The fraud worker's configuration, read from the environment (SPEC §6) once, at start. A bad
//! value fails here, naming the variable, never at the first message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;

use clap::Parser;
use domain::Currency;
use infra::amqp::Topology;
use infra::auth::TokenConfig;
use infra::server::HttpLimits;
use infra::telemetry::{LogFormat, redact_url};

use crate::rules::{
    MAJOR_UNITS_MAX, PerCurrency, RuleName, Rules, ThresholdRule, VELOCITY_WINDOW_SECONDS_MAX,
    VelocityRule,
};

/// Longest Redis key prefix: keys stay short and readable.
const REDIS_KEY_PREFIX_CHARS_MAX: usize = 64;

/// The largest prefetch: more unacknowledged messages than this buys no throughput on one
/// worker and only lengthens what a crash sends back to the queue.
pub const PREFETCH_MAX: u16 = 1000;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "fraud-worker",
    version,
    about = "The ledger's fraud worker: evaluates each transaction.created and publishes a decision."
)]
pub struct Config {
    /// RabbitMQ, where `transaction.created` arrives and decisions leave.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true,
        value_parser = parse_amqp_url
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name (`<prefix>.events`, ...).
    #[arg(long, env = "AMQP_PREFIX", default_value = "ledger", value_parser = parse_amqp_prefix)]
    pub amqp_prefix: String,

    /// Redis, where the velocity rule keeps its per-account counters.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true,
        value_parser = parse_redis_url
    )]
    pub redis_url: String,

    /// Prefix of every Redis key the worker writes.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "ledger:fraud", value_parser = parse_redis_key_prefix)]
    pub redis_key_prefix: String,

    /// The token secret, issuer and audience shared with the gateway.
    #[command(flatten)]
    pub token: TokenConfig,

    /// The listener's header, body and idle timeouts and its connection bound.
    #[command(flatten)]
    pub http: HttpLimits,

    /// Where the HTTP API (`/api/v1/fraud/rules`, `/health`, `/metrics`) listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8083")]
    pub listen_addr: SocketAddr,

    /// The fraud rules' parameters (`FRAUD_*`), shared with `ledger serve`.
    #[command(flatten)]
    pub fraud: RulesConfig,

    /// Unacknowledged messages the broker hands the worker at once; also how many it evaluates
    /// concurrently.
    #[arg(long, env = "FRAUD_PREFETCH", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(PREFETCH_MAX)))]
    pub fraud_prefetch: u16,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,
}

/// The fraud rules' parameters: every process that runs the rules (the worker, `ledger serve`)
/// flattens this block, so the variables and their checks are written once.
#[derive(Debug, Clone, clap::Args)]
pub struct RulesConfig {
    /// `amount_threshold`: payments at or above this many major units of their currency are
    /// rejected.
    #[arg(long, env = "FRAUD_AMOUNT_THRESHOLD", default_value_t = 10_000, value_parser = parse_major_units)]
    pub fraud_amount_threshold: i64,

    /// Per-currency thresholds in major units, overriding the default: `JPY=1500000,KWD=3000`.
    #[arg(long, env = "FRAUD_AMOUNT_THRESHOLDS", default_value = "", value_parser = parse_currency_amounts)]
    pub fraud_amount_thresholds: CurrencyAmounts,

    /// `velocity`: the most a customer account may move per window, in major units.
    #[arg(long, env = "FRAUD_VELOCITY_LIMIT", default_value_t = 50_000, value_parser = parse_major_units)]
    pub fraud_velocity_limit: i64,

    /// Per-currency velocity limits in major units, overriding the default: `JPY=7500000`.
    #[arg(long, env = "FRAUD_VELOCITY_LIMITS", default_value = "", value_parser = parse_currency_amounts)]
    pub fraud_velocity_limits: CurrencyAmounts,

    /// Length of the velocity rule's sliding window.
    #[arg(long, env = "FRAUD_VELOCITY_WINDOW_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=VELOCITY_WINDOW_SECONDS_MAX))]
    pub fraud_velocity_window_seconds: u64,

    /// Rules switched off, comma separated: `amount_threshold`, `velocity`.
    #[arg(long, env = "FRAUD_RULES_DISABLED", default_value = "", value_parser = parse_rule_names)]
    pub fraud_rules_disabled: DisabledRules,
}

impl RulesConfig {
    /// The rule set these parameters describe.
    pub fn rules(&self) -> Rules {
        Rules {
            threshold: ThresholdRule {
                enabled: !self
                    .fraud_rules_disabled
                    .contains(RuleName::AmountThreshold),
                thresholds: PerCurrency {
                    default_major: self.fraud_amount_threshold,
                    overrides_major: self.fraud_amount_thresholds.0.clone(),
                },
            },
            velocity: VelocityRule {
                enabled: !self.fraud_rules_disabled.contains(RuleName::Velocity),
                limits: PerCurrency {
                    default_major: self.fraud_velocity_limit,
                    overrides_major: self.fraud_velocity_limits.0.clone(),
                },
                window_seconds: self.fraud_velocity_window_seconds,
            },
        }
    }
}

/// Major-unit amounts by currency, as `FRAUD_AMOUNT_THRESHOLDS` and `FRAUD_VELOCITY_LIMITS`
/// write them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrencyAmounts(pub BTreeMap<Currency, i64>);

/// The rules `FRAUD_RULES_DISABLED` switches off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisabledRules(pub Vec<RuleName>);

impl DisabledRules {
    pub fn contains(&self, rule: RuleName) -> bool {
        self.0.contains(&rule)
    }
}

impl Config {
    /// The rule set this configuration describes.
    pub fn rules(&self) -> Rules {
        self.fraud.rules()
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.amqp_prefix).expect("AMQP_PREFIX was validated by parse_amqp_prefix")
    }

    /// The configuration as it may be logged: passwords in URLs and the secret are hidden.
    pub fn redacted(&self) -> String {
        let disabled: Vec<_> = self
            .fraud
            .fraud_rules_disabled
            .0
            .iter()
            .map(|rule| rule.as_str())
            .collect();
        format!(
            "amqp_url={} amqp_prefix={} redis_url={} redis_key_prefix={} listen_addr={} \
             fraud_amount_threshold={} fraud_amount_thresholds={} fraud_velocity_limit={} \
             fraud_velocity_limits={} fraud_velocity_window_seconds={} fraud_rules_disabled={} \
             fraud_prefetch={} {} {}",
            redact_url(&self.amqp_url),
            self.amqp_prefix,
            redact_url(&self.redis_url),
            self.redis_key_prefix,
            self.listen_addr,
            self.fraud.fraud_amount_threshold,
            self.fraud.fraud_amount_thresholds,
            self.fraud.fraud_velocity_limit,
            self.fraud.fraud_velocity_limits,
            self.fraud.fraud_velocity_window_seconds,
            disabled.join(","),
            self.fraud_prefetch,
            self.token.describe(),
            self.http.describe(),
        )
    }
}

impl std::fmt::Display for CurrencyAmounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<_> = self
            .0
            .iter()
            .map(|(currency, major)| format!("{currency}={major}"))
            .collect();
        f.write_str(&entries.join(","))
    }
}

fn parse_amqp_url(text: &str) -> Result<String, String> {
    lapin::uri::AMQPUri::from_str(text)
        .map(|_| text.to_owned())
        .map_err(|error| format!("not an AMQP URL: {error}"))
}

fn parse_amqp_prefix(text: &str) -> Result<String, String> {
    Topology::new(text)
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

fn parse_redis_url(text: &str) -> Result<String, String> {
    redis::Client::open(text)
        .map(|_| text.to_owned())
        .map_err(|error| format!("not a Redis URL: {error}"))
}

fn parse_redis_key_prefix(text: &str) -> Result<String, String> {
    let valid = (1..=REDIS_KEY_PREFIX_CHARS_MAX).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-'));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "must be 1-{REDIS_KEY_PREFIX_CHARS_MAX} characters of [A-Za-z0-9:._-]"
        ))
    }
}

fn parse_major_units(text: &str) -> Result<i64, String> {
    let value: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of major units"))?;
    if (1..=MAJOR_UNITS_MAX).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is outside 1..={MAJOR_UNITS_MAX}"))
    }
}

/// `JPY=1500000,KWD=3000`: known ISO 4217 codes, each at most once, whole major units.
fn parse_currency_amounts(text: &str) -> Result<CurrencyAmounts, String> {
    let mut amounts = BTreeMap::new();
    for entry in text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
    {
        let (code, value) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?} is not CURRENCY=AMOUNT"))?;
        let currency = Currency::from_code(code.trim())
            .map_err(|_| format!("{:?} is not a currency the ledger knows", code.trim()))?;
        let major = parse_major_units(value)?;
        if amounts.insert(currency, major).is_some() {
            return Err(format!("{currency} is listed twice"));
        }
    }
    Ok(CurrencyAmounts(amounts))
}

fn parse_rule_names(text: &str) -> Result<DisabledRules, String> {
    let mut rules = Vec::new();
    for name in text
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let rule = RuleName::parse(name).ok_or_else(|| {
            let known: Vec<_> = RuleName::ALL.iter().map(|rule| rule.as_str()).collect();
            format!("{name:?} is not a rule; the rules are {}", known.join(", "))
        })?;
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    Ok(DisabledRules(rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-secret-that-is-long-enough-for-hs256-signing";

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut arguments = vec!["fraud-worker", "--jwt-secret", SECRET];
        arguments.extend_from_slice(extra);
        Config::try_parse_from(arguments)
    }

    #[test]
    fn defaults_are_the_specified_ones() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.amqp_prefix, "ledger");
        assert_eq!(config.redis_key_prefix, "ledger:fraud");
        assert_eq!(config.listen_addr.port(), 8083);
        assert_eq!(config.fraud.fraud_amount_threshold, 10_000);
        assert_eq!(config.fraud.fraud_velocity_limit, 50_000);
        assert_eq!(config.fraud.fraud_velocity_window_seconds, 600);
        assert_eq!(config.fraud_prefetch, 32);
        let rules = config.rules();
        assert!(rules.threshold.enabled && rules.velocity.enabled);
        assert!(rules.threshold.thresholds.overrides_major.is_empty());
    }

    #[test]
    fn per_currency_overrides_and_disabled_rules_parse() {
        let config = parse(&[
            "--fraud-amount-thresholds",
            " JPY=1500000, KWD=3000 ",
            "--fraud-rules-disabled",
            "velocity",
        ])
        .expect("valid values parse");
        let rules = config.rules();
        let jpy = Currency::from_code("JPY").expect("known");
        let kwd = Currency::from_code("KWD").expect("known");
        assert_eq!(rules.threshold.thresholds.major(jpy), 1_500_000);
        assert_eq!(rules.threshold.thresholds.minor(kwd), 3_000_000);
        assert!(rules.threshold.enabled);
        assert!(!rules.velocity.enabled);
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let cases: [(&[&str], &str); 9] = [
            (
                &["--fraud-amount-thresholds", "XXX=10"],
                "fraud-amount-thresholds",
            ),
            (
                &["--fraud-amount-thresholds", "usd=10"],
                "fraud-amount-thresholds",
            ),
            (
                &["--fraud-amount-thresholds", "USD=1,USD=2"],
                "listed twice",
            ),
            (&["--fraud-amount-thresholds", "USD"], "CURRENCY=AMOUNT"),
            (&["--fraud-amount-threshold", "0"], "fraud-amount-threshold"),
            (&["--fraud-velocity-limit", "10.5"], "fraud-velocity-limit"),
            (
                &["--fraud-rules-disabled", "amount_threshold,speed"],
                "velocity",
            ),
            (&["--fraud-prefetch", "0"], "fraud-prefetch"),
            (&["--amqp-prefix", "Bad Prefix"], "amqp-prefix"),
        ];
        for (arguments, expected) in cases {
            let error = parse(arguments).expect_err("a bad value is refused");
            assert!(
                error.to_string().contains(expected),
                "{arguments:?}: {error}"
            );
        }
        let error = Config::try_parse_from(["fraud-worker", "--jwt-secret", "short"])
            .expect_err("a short secret is refused");
        assert!(error.to_string().contains("32 bytes"), "{error}");
        for (flag, value) in [
            ("--redis-url", "http://not-redis"),
            ("--amqp-url", "nonsense"),
            ("--redis-key-prefix", "has space"),
            ("--fraud-velocity-window-seconds", "0"),
            ("--log-format", "xml"),
        ] {
            assert!(parse(&[flag, value]).is_err(), "{flag} {value} is refused");
        }
    }

    #[test]
    fn the_logged_configuration_hides_passwords() {
        let config = parse(&[
            "--amqp-url",
            "amqp://ledger:s3cret@rabbit:5672/%2f",
            "--redis-url",
            "redis://:hunter2@cache:6379",
        ])
        .expect("valid values parse");
        let logged = config.redacted();
        assert!(
            !logged.contains("s3cret") && !logged.contains("hunter2"),
            "{logged}"
        );
        assert!(logged.contains("amqp://ledger:***@rabbit"), "{logged}");
        assert!(!logged.contains(SECRET), "{logged}");
    }
}
