//! Money as integers: ISO 4217 currencies with their exponents, positive amounts in minor units
//! with the bounds of SPEC §3, exact parsing of decimal text and formatting back to it.
//!
//! There is no floating point anywhere: an amount is parsed digit by digit from the text the
//! client sent (a JSON string, or the raw text of a JSON number), and every sum is checked.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount a single transaction may move, in minor units (SPEC §3: 10^15).
/// Ten thousand such amounts still fit in an `i64` balance, so balances overflow only under
/// absurd totals, which are checked anyway.
pub const AMOUNT_MINOR_MAX: i64 = 1_000_000_000_000_000;

/// An ISO 4217 currency we accept, with the number of decimals of its minor unit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    exponent: u8,
}

/// The currencies the ledger knows, with their ISO 4217 exponents. The list is deliberately
/// finite: an unknown code is refused at the edge rather than guessed at.
const CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("TND", 3),
    ("TRY", 2),
    ("USD", 2),
    ("ZAR", 2),
];

impl Currency {
    /// Looks a currency up by its ISO 4217 code (upper case, exactly three letters).
    pub fn from_code(code: &str) -> Result<Self, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|&(code, exponent)| Currency { code, exponent })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.chars().take(16).collect()))
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    /// Number of decimals of the minor unit: 2 for USD, 0 for JPY, 3 for KWD.
    pub fn exponent(self) -> u8 {
        self.exponent
    }

    /// Every currency the ledger accepts.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES
            .iter()
            .map(|&(code, exponent)| Currency { code, exponent })
    }

    /// How many minor units one major unit is worth (100 for USD, 1 for JPY).
    pub fn minor_per_major(self) -> i64 {
        10_i64.pow(u32::from(self.exponent))
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(code: &str) -> Result<Self, MoneyError> {
        Currency::from_code(code)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::from_code(&code).map_err(serde::de::Error::custom)
    }
}

/// A strictly positive amount of minor units, at most [`AMOUNT_MINOR_MAX`]. The currency travels
/// beside it; an `Amount` that exists is valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub fn from_minor(minor: i64) -> Result<Self, MoneyError> {
        if minor <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if minor > AMOUNT_MINOR_MAX {
            return Err(MoneyError::TooLarge);
        }
        Ok(Amount(minor))
    }

    pub fn minor(self) -> i64 {
        self.0
    }

    /// Parses a decimal text such as `"125.50"` in `currency`: digits, at most one dot, at most
    /// as many decimals as the currency has, strictly positive, at most 10^15 minor units.
    /// Signs, exponents, spaces and separators are refused; nothing is rounded.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, MoneyError> {
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(whole) || fraction.is_some_and(|part| !all_digits(part)) {
            return Err(MoneyError::NotADecimal);
        }
        let fraction = fraction.unwrap_or("");
        let exponent = usize::from(currency.exponent());
        if fraction.len() > exponent {
            return Err(MoneyError::TooManyDecimals {
                currency,
                allowed: currency.exponent(),
            });
        }
        // Fold the digits of whole and fraction, then scale by the missing decimals. Leading
        // zeros are harmless; overflow anywhere means the amount is far above the maximum.
        let mut minor: i64 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(digit - b'0')))
                .ok_or(MoneyError::TooLarge)?;
        }
        for _ in fraction.len()..exponent {
            minor = minor.checked_mul(10).ok_or(MoneyError::TooLarge)?;
        }
        Amount::from_minor(minor)
    }

    /// The amount as decimal text with exactly the currency's decimals.
    pub fn format(self, currency: Currency) -> String {
        format_minor(self.0, currency)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let minor = i64::deserialize(deserializer)?;
        Amount::from_minor(minor).map_err(serde::de::Error::custom)
    }
}

/// Formats a signed number of minor units with exactly the currency's decimals:
/// `-12550` in USD is `"-125.50"`, `500` in JPY is `"500"`.
pub fn format_minor(minor: i64, currency: Currency) -> String {
    let exponent = u32::from(currency.exponent());
    let sign = if minor < 0 { "-" } else { "" };
    let magnitude = minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10_u64.pow(exponent);
    let width = exponent as usize;
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = width
    )
}

/// Why a piece of money text or a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency code {0:?}: expected an ISO 4217 code such as USD, EUR, GBP or JPY")]
    UnknownCurrency(String),
    #[error("amount must be a decimal number such as \"125.50\": digits with at most one '.'")]
    NotADecimal,
    #[error("amount has more decimals than {currency} allows ({allowed})")]
    TooManyDecimals { currency: Currency, allowed: u8 },
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount is above the maximum of 10^15 minor units")]
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd() -> Currency {
        Currency::from_code("USD").expect("USD is in the table")
    }
    fn jpy() -> Currency {
        Currency::from_code("JPY").expect("JPY is in the table")
    }
    fn kwd() -> Currency {
        Currency::from_code("KWD").expect("KWD is in the table")
    }

    #[test]
    fn parses_exact_decimals_into_minor_units() {
        assert_eq!(Amount::parse("125.50", usd()).map(Amount::minor), Ok(12550));
        assert_eq!(Amount::parse("125.5", usd()).map(Amount::minor), Ok(12550));
        assert_eq!(Amount::parse("125", usd()).map(Amount::minor), Ok(12500));
        assert_eq!(Amount::parse("0.01", usd()).map(Amount::minor), Ok(1));
        assert_eq!(Amount::parse("500", jpy()).map(Amount::minor), Ok(500));
        assert_eq!(Amount::parse("1.234", kwd()).map(Amount::minor), Ok(1234));
    }

    #[test]
    fn refuses_what_spec_section_3_refuses() {
        let cases = [
            ("", MoneyError::NotADecimal),
            ("abc", MoneyError::NotADecimal),
            ("-1.00", MoneyError::NotADecimal),
            ("+1.00", MoneyError::NotADecimal),
            ("1e3", MoneyError::NotADecimal),
            (" 1.00", MoneyError::NotADecimal),
            ("1,00", MoneyError::NotADecimal),
            ("1.", MoneyError::NotADecimal),
            (".5", MoneyError::NotADecimal),
            ("1.2.3", MoneyError::NotADecimal),
            ("0", MoneyError::NotPositive),
            ("0.00", MoneyError::NotPositive),
            (
                "1.001",
                MoneyError::TooManyDecimals {
                    currency: usd(),
                    allowed: 2,
                },
            ),
            ("10000000000000.01", MoneyError::TooLarge),
            ("99999999999999999999999999", MoneyError::TooLarge),
        ];
        for (text, expected) in cases {
            assert_eq!(
                Amount::parse(text, usd()),
                Err(expected),
                "parsing {text:?}"
            );
        }
        assert_eq!(
            Amount::parse("1.5", jpy()),
            Err(MoneyError::TooManyDecimals {
                currency: jpy(),
                allowed: 0
            })
        );
    }

    #[test]
    fn the_maximum_is_inclusive() {
        assert_eq!(
            Amount::parse("10000000000000.00", usd()).map(Amount::minor),
            Ok(AMOUNT_MINOR_MAX)
        );
        assert_eq!(
            Amount::parse("1000000000000000", jpy()).map(Amount::minor),
            Ok(AMOUNT_MINOR_MAX)
        );
        assert_eq!(
            Amount::parse("1000000000000001", jpy()),
            Err(MoneyError::TooLarge)
        );
    }

    #[test]
    fn formats_with_exactly_the_currency_decimals() {
        assert_eq!(format_minor(12550, usd()), "125.50");
        assert_eq!(format_minor(-12550, usd()), "-125.50");
        assert_eq!(format_minor(5, usd()), "0.05");
        assert_eq!(format_minor(0, usd()), "0.00");
        assert_eq!(format_minor(500, jpy()), "500");
        assert_eq!(format_minor(1, kwd()), "0.001");
        assert_eq!(format_minor(i64::MIN, usd()), "-92233720368547758.08");
    }

    #[test]
    fn unknown_currencies_are_refused() {
        assert!(Currency::from_code("usd").is_err());
        assert!(Currency::from_code("XXX").is_err());
        assert!(Currency::from_code("").is_err());
        assert_eq!(Currency::from_code("GBP").map(Currency::exponent), Ok(2));
    }

    #[test]
    fn currency_serialises_as_its_code() {
        let json = serde_json::to_string(&usd()).expect("a currency serialises");
        assert_eq!(json, "\"USD\"");
        let back: Currency = serde_json::from_str(&json).expect("and deserialises");
        assert_eq!(back, usd());
        assert!(serde_json::from_str::<Currency>("\"XYZ\"").is_err());
    }

    proptest! {
        /// Formatting then parsing any valid amount gives the same minor units, in every currency.
        #[test]
        fn format_then_parse_round_trips(minor in 1..=AMOUNT_MINOR_MAX, index in 0..CURRENCIES.len()) {
            let (code, _) = CURRENCIES[index];
            let currency = Currency::from_code(code).expect("from the table");
            let amount = Amount::from_minor(minor).expect("in range");
            prop_assert_eq!(Amount::parse(&amount.format(currency), currency), Ok(amount));
        }

        /// Any text made of arbitrary characters either parses to an amount in range or is
        /// refused; it never panics and never yields a non-positive amount.
        #[test]
        fn arbitrary_text_never_yields_an_invalid_amount(text in "[0-9.+eE -]{0,24}") {
            if let Ok(amount) = Amount::parse(&text, usd()) {
                prop_assert!(amount.minor() > 0 && amount.minor() <= AMOUNT_MINOR_MAX);
            }
        }
    }
}
