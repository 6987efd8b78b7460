/*
 * dagserve admin contract: the model lifecycle (load, traffic, variants, reload, unload).
 *
 * Served on its own port (`admin_port` in the server config, off by default), never on the
 * inference port.  Transport: framed.  Protocol: binary.  Any Apache Thrift client (C++,
 * Java, Go, Python) calls it unchanged: plain structs, no includes.
 *
 * Authentication: framed binary Thrift has no transport headers, so every method takes the
 * token as its first argument.  With `admin_token_file` set, a call whose token differs from
 * that file's content is answered `Unauthorized` (no detail); without one, send "".  With TLS
 * on the server, the admin port speaks TLS too, and `admin_require_client_cert` limits it to
 * clients holding a certificate from the CA.
 *
 * Field ids are fixed once released: add new fields with new ids, never reuse one.
 */
namespace py dagserve_admin_idl
namespace cpp dagserve.admin
namespace java io.dagserve.thrift.admin
namespace go dagserveadmin

/* The variants of one node (`variants:` in the pipeline YAML), as they split its requests now.
 * Weights are percents of the node's requests; the node itself answers the rest. */
struct NodeVariants {
  1: required map<string, double> weights,  // each variant that may answer -> its percent
  2: required double own_weight,            // the node's own share: 100 - the sum of weights
  3: optional string shadow,                // the variant that gets mirrored copies (no weight)
}

/* One version of one pipeline, as the server holds it now. */
struct VersionInfo {
  1: required string pipeline,
  2: required string version,
  3: required string state,           // "loading" | "ready" | "draining" | "failed"
  4: optional string why,             // for "failed": the error message
  5: required double weight,          // share of the requests that name no version
  6: required bool shadow,            // receives mirrored copies of the requests
  7: optional string sticky_header,   // the request header hashed to pick a version
  8: required i32 inflight,           // requests running on it now
  9: optional string path,            // the YAML it was loaded from, as the server sees it
  10: optional list<string> models,   // model ids it uses
  11: optional map<string, NodeVariants> variants,  // node -> its variants (nodes that have any)
}

/* The server refused the change (unknown pipeline or version, a load that failed, invalid
 * weights, not enough GPU memory for a blue/green reload): nothing changed.  The message
 * says why. */
exception AdminError {
  1: required string message,
}

/* The token is missing or wrong.  Deliberately without detail. */
exception Unauthorized {
}

service AdminService {
  /* Every version of every pipeline, with its state and traffic. */
  list<VersionInfo> list_versions(1: string token)
    throws (1: Unauthorized unauthorized),

  /* Load the pipeline version in the YAML at `path` (a path on the server) beside the ones
   * serving.  The first version of a name takes all its traffic; a later one none until
   * `traffic` gives it some. */
  VersionInfo load(1: string token, 2: string path)
    throws (1: Unauthorized unauthorized, 2: AdminError error),

  /* Split the requests for `pipeline` that name no version by `weights` (normalised;
   * versions not named get 0).  `shadow`: a version that receives a mirrored copy of each
   * request and never answers.  `sticky_header`: a request header whose value, hashed,
   * picks the version.  Answers the pipeline's versions after the change. */
  list<VersionInfo> traffic(1: string token, 2: string pipeline, 3: map<string, double> weights,
                            4: optional string shadow, 5: optional string sticky_header)
    throws (1: Unauthorized unauthorized, 2: AdminError error),

  /* Re-read the version's YAML and model files and swap them in blue/green (`in_place`:
   * accept a pause instead when the device cannot hold both). */
  VersionInfo reload(1: string token, 2: string pipeline, 3: string version, 4: bool in_place)
    throws (1: Unauthorized unauthorized, 2: AdminError error),

  /* Set the weights (percent of the node's requests) of the variants of `node` in one ready
   * version; variants not named keep theirs, the node itself answers what they all leave.
   * Refused, changing nothing: an unknown version, node or variant, a node without variants,
   * the shadow given weight, a weight not from 0 to 100, or weights adding up to over 100.
   * A reload of the version starts again from its YAML's weights.  Answers the version after
   * the change (its `variants`). */
  VersionInfo variants(1: string token, 2: string pipeline, 3: string version, 4: string node,
                       5: map<string, double> weights)
    throws (1: Unauthorized unauthorized, 2: AdminError error),

  /* Stop routing to the version, drain its requests in flight, free its models. */
  void unload(1: string token, 2: string pipeline, 3: string version)
    throws (1: Unauthorized unauthorized, 2: AdminError error),
}
