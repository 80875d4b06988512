//! `history`: paging queries, their limits, and their replies.

use crate::chat::core::{Hub, QueryWaiter, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::chat::protocol::ErrorCode;
use crate::chat::ratelimit::TokenBucket;
use crate::chat::store::{self, Query, Target};
use crate::chat::validate;
use crate::service::ConnId;

impl Hub {
    /// Queries (`history`, `catchup`) cost the store real work: a few in flight per connection
    /// and a rate per user, so one client pipelining thousands cannot queue seconds of work
    /// ahead of everyone's messages. Answers `rate_limited` and returns false past either.
    pub(in crate::chat::core) fn admit_query(
        &mut self,
        conn: ConnId,
        key: &str,
        r: Option<&str>,
    ) -> bool {
        let in_flight = self.conns.get(&conn).map_or(0, |c| c.queries);
        if in_flight >= self.cfg.queries_in_flight {
            self.error(
                conn,
                ErrorCode::RateLimited,
                "too many history requests in flight; wait for the replies",
                r,
            );
            return false;
        }
        let (rate, burst) = (self.cfg.query_rate, self.cfg.query_burst);
        let now = self.now.mono;
        let allowed = self.users.get_mut(key).is_some_and(|u| {
            u.query_bucket
                .get_or_insert_with(|| TokenBucket::new(burst, now))
                .try_take(rate, burst, now)
        });
        if !allowed {
            self.error(conn, ErrorCode::RateLimited, "history requests too fast", r);
        }
        allowed
    }

    /// Counts a query of `conn` as in flight (`--queries-in-flight`) and returns the flag that
    /// tells the store to skip it if the connection closes first; `None` if it is gone.
    pub(in crate::chat::core) fn query_started(
        &mut self,
        conn: ConnId,
    ) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        let c = self.conns.get_mut(&conn)?;
        c.queries += 1;
        Some(c.gone.get_or_insert_with(Default::default).clone())
    }

    /// A query of `conn` was answered: no longer in flight. False if the connection is gone
    /// (nobody to answer).
    pub(in crate::chat::core) fn query_answered(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.queries = c.queries.saturating_sub(1);
        true
    }

    #[allow(clippy::too_many_arguments)]
    pub(in crate::chat::core) fn history(
        &mut self,
        conn: ConnId,
        key: &str,
        room: Option<String>,
        with: Option<String>,
        before: Option<i64>,
        after: Option<i64>,
        limit: Option<u32>,
        r: Option<&str>,
    ) {
        let limit = limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
        if limit == 0 || limit > MAX_HISTORY_LIMIT {
            return self.error(conn, ErrorCode::BadRequest, "limit must be 1-200", r);
        }
        if !self.admit_query(conn, key, r) {
            return;
        }
        let (target, room, with) = match (room, with) {
            (Some(room), None) => {
                if let Err((c, m)) = validate::room_name(&room) {
                    return self.error(conn, c, &m, r);
                }
                if !self
                    .rooms
                    .get(&room)
                    .is_some_and(|rm| rm.members.contains(key))
                {
                    return self.error(conn, ErrorCode::NotMember, "not a member", r);
                }
                (Target::Room(room.clone()), Some(room), None)
            }
            (None, Some(with)) => {
                if let Err((c, m)) = validate::user_name(&with) {
                    return self.error(conn, c, &m, r);
                }
                let wk = validate::user_key(&with);
                let Some(w) = self.users.get(&wk) else {
                    return self.error(conn, ErrorCode::NoSuchUser, "no such user", r);
                };
                (
                    Target::Dm(store::dm_key(key, &wk)),
                    None,
                    Some(w.name.clone()),
                )
            }
            _ => {
                return self.error(
                    conn,
                    ErrorCode::BadRequest,
                    "exactly one of room and with is required",
                    r,
                )
            }
        };
        let Some(cancelled) = self.query_started(conn) else {
            return;
        };
        self.query(
            Query::History {
                target,
                before,
                after,
                limit: limit as usize,
                cancelled: Some(cancelled),
            },
            QueryWaiter::History {
                conn,
                reference: r.map(str::to_string),
                room,
                with,
            },
        );
    }
}
