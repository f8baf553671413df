//! The velocity counters in Redis (the distributed mode).
//!
//! Each account has a sorted set of its counted payments (member `<transaction_id>:<amount_minor>`,
//! score = the transaction's creation time in milliseconds) and a running total beside it. One
//! Lua script, atomically: drops the entries that left the window, adds this payment with
//! `ZADD NX`, reads the total, and if the total is over the limit takes the payment out again.
//! `NX` makes it idempotent per transaction: a redelivered or re-evaluated message finds its
//! member already there and is not counted twice. Taking a rejected payment out in the same
//! script means refused money never uses up the customer's allowance, not even for a moment in
//! which a concurrent payment of the same account could see it.
//!
//! The total is kept with `INCRBY`/`DECRBY`, returned as a string and compared with the limit
//! as a string of digits: Redis does the integer arithmetic, so no amount ever passes through a
//! Lua (floating-point) number.

use std::time::Duration;

use async_trait::async_trait;
use domain::AccountId;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Payment, VelocityCounters};
use crate::error::{Error, RedisContext, Result, within};

/// How long one Redis command may take before the message is retried later. Redis answers in
/// well under a millisecond; two seconds means it is down or stalled.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnection attempts per command while Redis is away; the message is retried after that.
const REDIS_RECONNECT_ATTEMPTS: usize = 2;

/// Counts a payment and returns the window total including it, as a string.
/// KEYS: entries, total. ARGV: member, amount_minor, score_ms, cutoff_ms, window_ms, limit_minor.
const RECORD_SCRIPT: &str = r"
local function exceeds(total, limit)
  if string.sub(total, 1, 1) == '-' then
    return false
  end
  if #total ~= #limit then
    return #total > #limit
  end
  return total > limit
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
for _, member in ipairs(expired) do
  local amount = string.match(member, ':(%d+)$')
  if amount then
    redis.call('DECRBY', KEYS[2], amount)
  end
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
end
if redis.call('ZADD', KEYS[1], 'NX', ARGV[3], ARGV[1]) == 1 then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
local total = redis.call('GET', KEYS[2]) or '0'
if exceeds(total, ARGV[6]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DECRBY', KEYS[2], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return total
";

/// The per-account payment windows in Redis.
#[derive(Clone)]
pub struct RedisCounters {
    redis: ConnectionManager,
    key_prefix: String,
    record: Script,
}

impl RedisCounters {
    /// A counter on `redis_url`. The connection is made lazily and re-made after a loss; call
    /// [`RedisCounters::ping`] to know whether Redis answers.
    pub fn new(redis_url: &str, key_prefix: &str) -> Result<Self> {
        let client = redis::Client::open(redis_url).context("opening the Redis client")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(REDIS_RECONNECT_ATTEMPTS);
        let redis = ConnectionManager::new_lazy_with_config(client, config)
            .context("creating the Redis connection manager")?;
        Ok(RedisCounters {
            redis,
            key_prefix: key_prefix.to_owned(),
            record: Script::new(RECORD_SCRIPT),
        })
    }

    /// The keys of an account's window. The braces are a cluster hash tag: both keys of one
    /// account live on one shard, as a script touching both requires.
    pub fn keys(&self, account_id: AccountId) -> (String, String) {
        let base = format!("{}:velocity:{{{account_id}}}", self.key_prefix);
        (format!("{base}:entries"), format!("{base}:total"))
    }
}

#[async_trait]
impl VelocityCounters for RedisCounters {
    #[tracing::instrument(skip_all, fields(account_id = %payment.account_id, transaction_id = %payment.transaction_id), err)]
    async fn record(&self, payment: &Payment, window_ms: i64, limit_minor: i64) -> Result<i64> {
        let member = format!("{}:{}", payment.transaction_id, payment.amount_minor);
        let (entries, total) = self.keys(payment.account_id);
        let score_ms = payment.created_at.timestamp_millis();
        let cutoff_ms = score_ms.saturating_sub(window_ms);
        let mut redis = self.redis.clone();
        let total: String = within(REDIS_TIMEOUT, "counting a payment", async {
            self.record
                .key(&entries)
                .key(&total)
                .arg(member)
                .arg(payment.amount_minor)
                .arg(score_ms)
                .arg(cutoff_ms)
                .arg(window_ms)
                .arg(limit_minor)
                .invoke_async(&mut redis)
                .await
                .context("counting a payment")
        })
        .await?;
        total.parse::<i64>().map_err(|_| Error::RedisReply {
            context: "counting a payment",
            detail: format!("the window total {total:?} is not an integer"),
        })
    }

    /// Whether Redis answers `PING` within [`REDIS_TIMEOUT`].
    async fn ping(&self) -> bool {
        let mut redis = self.redis.clone();
        let answer = within(REDIS_TIMEOUT, "pinging Redis", async {
            redis::cmd("PING")
                .query_async::<String>(&mut redis)
                .await
                .context("pinging Redis")
        })
        .await;
        matches!(answer.as_deref(), Ok("PONG"))
    }

    fn store(&self) -> &'static str {
        "redis"
    }
}
