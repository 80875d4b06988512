//! Cluster mode: applying what other nodes did (log entries, in log order), presence across
//! nodes, and the parts of `say` and changes whose ids the database assigns.

use std::collections::{HashMap, HashSet};

use crate::chat::store::cluster::{ClusterLoaded, NodeId};

/// What a clustered hub knows beyond a single node's state.
pub struct ClusterState {
    /// This node (the `origin` of what it appends to the log).
    pub node: NodeId,
    /// The last log position applied: the hub's state is the database's at this position
    /// (plus its own writes not yet committed).
    pub log_pos: i64,
    /// Users with a connection open on another node, by user key: the nodes.
    pub remote: HashMap<String, HashSet<NodeId>>,
}

impl ClusterState {
    pub fn new(loaded: ClusterLoaded) -> ClusterState {
        let mut remote: HashMap<String, HashSet<NodeId>> = HashMap::new();
        for (node, user) in loaded.online {
            if node != loaded.node {
                remote.entry(user).or_default().insert(node);
            }
        }
        ClusterState {
            node: loaded.node,
            log_pos: loaded.log_pos,
            remote,
        }
    }

    /// Whether `key` has a connection open on another node.
    pub fn online_elsewhere(&self, key: &str) -> bool {
        self.remote.get(key).is_some_and(|n| !n.is_empty())
    }
}
