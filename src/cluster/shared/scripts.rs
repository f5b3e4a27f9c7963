//! The shared tier's Lua scripts: every check-and-store is one script, so Redis runs it
//! atomically, and each announcement of a write or a purge is published by the same script that
//! applies it to the shared tier (one round trip, nothing in between).
//!
//! One Redis hash per contact and keyspace, `{key_prefix}:v1:c:{key id}:{digest}`:
//! - `g`: the contact's generation, a random value replaced by every write (when it is
//!   announced, and again when it ends) and every purge, and set by a fill that finds none;
//! - `p:{instance}:{write}`: a write in flight, until its expiry (Redis time, ms);
//! - `a`, `ae`, `at`, `ep`, `ab`: the sealed answer, when it expires (Redis ms), its TTL (ms),
//!   the epoch it was stored in, and when the fill that read it began (Redis ms; sealed too);
//! - `l`, `le`: the fill lock (who holds it, until when).
//!
//! A fill stores only under the very generation it read when it began, and a fill that finds
//! no generation makes one (random): when the hash is lost mid-fill (evicted, deleted), the
//! generation is gone or another, never the one the fill saw, so nothing that was current
//! before the loss is mistaken for current after it. The hash lives at least `guard` ms after
//! every change, and as long as its answer. The cluster's epoch, `{key_prefix}:v1:epoch` (`e`: the epoch, `q`: until when
//! nothing may be stored), is replaced when Redis may have lost writes (it restarted, or failed
//! over to a replica): every answer of an older epoch is then a miss, and for one pending
//! lifetime no fill stores (a write whose announcement was lost may still be in flight).
//!
//! Times are Redis' own (`TIME`), so the instances' clocks never matter.

use std::sync::LazyLock;

use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, RedisResult, ToRedisArgs};

/// Helpers every script starts with.
const COMMON: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Whether a write of the contact is in flight (expired entries are dropped).
local function write_in_flight(key, now)
  local busy = false
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'p:' then
      if tonumber(fields[i + 1]) <= now then
        redis.call('HDEL', key, fields[i])
      else
        busy = true
      end
    end
  end
  return busy
end
-- The epoch, and whether stores are held off.
local function epoch(key, now)
  local e = redis.call('HMGET', key, 'e', 'q')
  return e[1] or '', (tonumber(e[2]) or 0) > now
end
-- Keeps the hash `guard` ms more, or as long as its answer.
local function keep(key, now, guard)
  local ttl = guard
  local ae = tonumber(redis.call('HGET', key, 'ae'))
  if ae and ae - now > ttl then ttl = ae - now end
  redis.call('PEXPIRE', key, ttl)
end
local function store_answer(key, now, sealed, ttl, ep, begun)
  redis.call('HSET', key, 'a', sealed, 'ae', now + ttl, 'at', ttl, 'ep', ep, 'ab', begun)
end
local function drop_answer(key)
  redis.call('HDEL', key, 'a', 'ae', 'at', 'ep', 'ab')
end
"#;

/// A fill begins. KEYS: contact, epoch. ARGV: lock id, lock ms, guard ms, the Redis time (ms)
/// after which an answer's read must have begun for the instance to take it, a generation for
/// a contact without one.
/// {1, sealed, now, generation, epoch}: an answer (what it was sealed with) | {2}: a write in
/// flight (or stores held off): fetch, do not store | {3}: another instance's fill holds the
/// lock | {4, generation, epoch, now, 1 when it replaces an answer}: this fill holds it now. An
/// answer older than the instance may take is replaced by this fill, as if there were none.
pub static FILL_BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, now = KEYS[1], now_ms()
local ep, quiet = epoch(KEYS[2], now)
local f = redis.call('HMGET', key, 'a', 'ae', 'ab', 'ep', 'g', 'l', 'le')
local answer = f[1] and f[2] and f[3] and f[5] and tonumber(f[2]) > now and f[4] == ep
if answer and tonumber(f[3]) > tonumber(ARGV[4]) then
  return {1, f[1], now, f[5], ep}
end
if quiet or write_in_flight(key, now) then return {2} end
if f[6] and f[7] and tonumber(f[7]) > now then return {3} end
local gen = f[5]
if not gen then
  gen = ARGV[5]
  redis.call('HSET', key, 'g', gen)
end
redis.call('HSET', key, 'l', ARGV[1], 'le', now + tonumber(ARGV[2]))
keep(key, now, tonumber(ARGV[3]))
return {4, gen, ep, now, answer and 1 or 0}
"#,
    )
});

/// A fill stores its answer if the contact's generation is still the very one it began with
/// (no write began or ended since, and the hash was not lost: a missing generation refuses).
/// KEYS: contact, epoch. ARGV: generation and epoch seen, lock id, sealed answer, ttl ms,
/// guard ms, when the fill began (Redis ms). 1: stored, 0: not.
pub static FILL_STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, now = KEYS[1], now_ms()
local ep, quiet = epoch(KEYS[2], now)
local f = redis.call('HMGET', key, 'g', 'l')
if f[2] == ARGV[3] then redis.call('HDEL', key, 'l', 'le') end
if not f[1] or f[1] ~= ARGV[1] or ep ~= ARGV[2] or quiet or write_in_flight(key, now) then
  return 0
end
store_answer(key, now, ARGV[4], tonumber(ARGV[5]), ep, ARGV[7])
keep(key, now, tonumber(ARGV[6]))
return 1
"#,
    )
});

/// A fill gives its lock back without storing. KEYS: contact. ARGV: lock id.
pub static FILL_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'l') == ARGV[1] then redis.call('HDEL', KEYS[1], 'l', 'le') end
return 0
"#,
    )
});

/// A write is announced. KEYS: the contact in every keyspace. ARGV: channel, message, pending
/// field, pending ms, new generation, guard ms. The number of instances that got the message.
pub static WRITE_PENDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = now_ms()
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, 'g', ARGV[5], ARGV[3], now + tonumber(ARGV[4]))
  drop_answer(key)
  keep(key, now, tonumber(ARGV[6]))
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"#,
    )
});

/// A write's outcome is announced. KEYS: the contact in every keyspace. ARGV: channel,
/// message, pending field, outcome (applied | not_applied | unknown), new generation, guard ms.
/// A write that may have applied replaces the generation and drops the answer: the written
/// status is not stored (the instances read answers only from fills that began after every
/// change they know of, and the write's end reaches them after it); a write upstream refused
/// changes nothing.
pub static WRITE_DONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = now_ms()
for _, key in ipairs(KEYS) do
  redis.call('HDEL', key, ARGV[3])
  if ARGV[4] ~= 'not_applied' then
    redis.call('HSET', key, 'g', ARGV[5])
    drop_answer(key)
  end
  keep(key, now, tonumber(ARGV[6]))
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"#,
    )
});

/// An admin purge. KEYS: the contact in every keyspace. ARGV: channel, message, new
/// generation, guard ms.
pub static PURGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = now_ms()
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, 'g', ARGV[3])
  drop_answer(key)
  keep(key, now, tonumber(ARGV[4]))
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"#,
    )
});

/// Redis may have lost writes: a new epoch, and no stores for a while. KEYS: epoch. ARGV: new
/// epoch, quiet ms.
pub static NEW_EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'q', now_ms() + tonumber(ARGV[2]))
return 1
"#,
    )
});

/// The fleet's token. KEYS: token. {} | {id, sealed, lifetime ms, ms left}.
pub static TOKEN_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local f = redis.call('HMGET', KEYS[1], 'id', 't', 'l')
if not (f[1] and f[2] and f[3]) then return {} end
return {f[1], f[2], tonumber(f[3]), redis.call('PTTL', KEYS[1])}
"#,
    )
});

/// The renewal lock, unless the token was replaced. KEYS: token, lock. ARGV: the id of the token
/// to replace ('' for none), lock id, lock ms. {1, id, sealed, lifetime ms, ms left}: replaced |
/// {2}: locked | {3}: another instance holds the lock.
pub static TOKEN_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local f = redis.call('HMGET', KEYS[1], 'id', 't', 'l')
if f[1] and f[2] and f[3] and f[1] ~= ARGV[1] then
  return {1, f[1], f[2], tonumber(f[3]), redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2} end
return {3}
"#,
    )
});

/// A renewed token for the fleet; the lock released. KEYS: token, lock. ARGV: id, sealed,
/// lifetime ms, ms left, lock id.
pub static TOKEN_STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 't', ARGV[2], 'l', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
return 1
"#,
    )
});

/// The renewal lock released. KEYS: lock. ARGV: lock id.
pub static TOKEN_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// A script: run by its SHA-1 (`EVALSHA`), sent whole only when Redis does not have it yet
/// (after a restart or a failover).
pub struct Script {
    code: String,
    sha1: String,
}

impl Script {
    fn new(body: &str) -> Script {
        let code = format!("{COMMON}{body}");
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, code.as_bytes());
        Script {
            code,
            sha1: hex::encode(sha1.as_ref()),
        }
    }

    pub fn call(&self) -> Call<'_> {
        Call {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One run of a script: its keys and arguments.
pub struct Call<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    pub fn key(mut self, key: impl ToRedisArgs) -> Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// Puts `args` before the arguments given so far (the channel and the message of a
    /// script that publishes).
    pub fn args_first(mut self, args: &[&[u8]]) -> Self {
        let given = std::mem::take(&mut self.args);
        self.args = args.iter().map(|arg| arg.to_vec()).chain(given).collect();
        self
    }

    pub async fn run<T: FromRedisValue>(
        &self,
        connection: &mut MultiplexedConnection,
    ) -> RedisResult<T> {
        match self
            .command("EVALSHA", &self.script.sha1)
            .query_async(connection)
            .await
        {
            Err(err) if err.code() == Some("NOSCRIPT") => {
                self.command("EVAL", &self.script.code)
                    .query_async(connection)
                    .await
            }
            result => result,
        }
    }

    fn command(&self, name: &str, script: &str) -> redis::Cmd {
        let mut command = redis::cmd(name);
        command
            .arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        command
    }
}
