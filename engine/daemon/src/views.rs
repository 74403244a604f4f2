//! The shapes of the API's JSON answers that are more than a stored record: typed, so the
//! handlers and the OpenAPI document (`openapi.rs`) describe one and the same thing.

use mint_model::plan::Counts;
use mint_model::records::{Image, Tier};
use serde::Serialize;
use utoipa::ToSchema;

/// An error: a sentence that names the field or the thing, and what would fix it.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    /// Always `ok` when the daemon answers.
    pub status: String,
    /// The daemon's version.
    pub version: String,
    /// Whether this daemon leads.
    pub role: LeaderRole,
    /// Where the first admin token is: told only to callers on the daemon's own host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// Whether a daemon leads; a follower names the leader it last read.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LeaderRole {
    pub leads: bool,
    /// The leader's fencing token (its key's create-revision), when this daemon leads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
    /// The leader's URL, when this daemon follows one it knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// A tier as the API shows it: its record, how many instances hold nodes, and what the
/// reconciler is doing for it.
#[derive(Serialize, ToSchema)]
pub struct TierView {
    pub tier: Tier,
    /// Instances holding nodes (deploying, deployed or undeploying).
    pub deployed: usize,
    pub status: TierStatusView,
}

/// What the reconciler reports of a tier.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct TierStatusView {
    /// The tier's generation: bumped by every change of its intent.
    pub generation: u64,
    /// The generation the reconciler last worked toward.
    pub observed_generation: u64,
    pub counts: Counts,
    /// Whether the tier has reached its intent.
    pub settled: bool,
    /// Driver calls in flight.
    pub in_flight: Vec<crate::reconciler::InFlight>,
    /// Why the tier cannot reach its intent, if it cannot.
    pub blocked: Option<String>,
    /// The last driver failure, with the instance it was about.
    pub last_failure: Option<String>,
}

/// `POST /v1/tiers/{name}/scale`: the intent recorded and what will happen.
#[derive(Serialize, ToSchema)]
pub struct ScaleAnswer {
    pub tier: String,
    pub desired: u32,
    /// The tier's generation with this intent; `observed-generation` reaches it.
    pub generation: u64,
    pub counts: Counts,
    pub will: Will,
}

/// How many instances a scale request will deploy and undeploy.
#[derive(Serialize, ToSchema)]
pub struct Will {
    pub deploy: u32,
    pub undeploy: u32,
}

/// `GET /v1/images/{id}`: an image and the tiers that use it.
#[derive(Serialize, ToSchema)]
pub struct ImageView {
    pub image: Image,
    pub tiers: Vec<String>,
}

/// `DELETE /v1/images/{id}`.
#[derive(Serialize, ToSchema)]
pub struct DeletedImage {
    pub deleted: Image,
}

/// `DELETE /v1/tiers/{name}`.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// `DELETE /v1/nodes/{name}` and `DELETE /v1/plugins/{name}`.
#[derive(Serialize, ToSchema)]
pub struct Removed {
    pub removed: String,
}

/// `POST /v1/tiers/{name}/image`: the tier's new revision.
#[derive(Serialize, ToSchema)]
pub struct Revised {
    pub tier: String,
    pub revision: u64,
}

/// A token as `GET /v1/tokens` lists it: never the token or its hash.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct TokenListed {
    pub name: String,
    pub role: mint_model::records::Role,
    pub created_ms: u64,
}

/// `POST /v1/tokens`: the new token, shown this once.
#[derive(Serialize, ToSchema)]
pub struct NewTokenAnswer {
    pub name: String,
    pub role: mint_model::records::Role,
    pub token: String,
}

/// `DELETE /v1/tokens/{name}`.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    pub revoked: String,
    pub role: mint_model::records::Role,
}

/// `GET /v1/whoami`: who the credential sent is, as the daemon authenticated it.
#[derive(Serialize, ToSchema)]
pub struct Whoami {
    /// `operator` or `node`.
    pub kind: String,
    /// The token's or the node's name.
    pub name: String,
    /// An operator token's role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<mint_model::records::Role>,
}

/// `POST /v1/nodes/{name}/enroll`: the one-time join token, shown this once.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Enrolled {
    pub node: String,
    pub join_token: String,
    /// When it stops working (ms since the epoch).
    pub expires_ms: u64,
    /// The labels the node gets when it joins.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/agents/register`: the node as registered, and, when it joined with its join
/// token, its own credential and the one the engine presents to its agent (both once).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Registered {
    pub node: mint_model::records::Node,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_credential: Option<String>,
}

/// `GET /v1/blobs`: what each blob cost on the wire, and the blobs quarantined.
#[derive(Serialize, ToSchema)]
pub struct Delivered {
    pub served: std::collections::BTreeMap<String, crate::delivery::Served>,
    pub quarantined: Vec<String>,
}

/// `POST /v1/tiers/{name}/instances/{index}/materialize`: what was written, and where.
#[derive(Serialize, ToSchema)]
pub struct MaterializedInto {
    #[serde(flatten)]
    pub done: mint_core::images::materialize::Materialized,
    /// The new directory.
    pub into: String,
}

/// `POST /v1/nodes/{name}/heartbeat`: whether the agent must stop what it runs.
#[derive(Serialize, ToSchema)]
pub struct HeartbeatAnswer {
    pub fence: bool,
    pub reason: Option<String>,
}
