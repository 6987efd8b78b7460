/*
 * dagserve wire contract.
 *
 * Transport: framed.  Protocol: binary.  Any official Apache Thrift client
 * (C++, Java, Go, Python) calls this service unchanged.
 *
 * Field ids are fixed once released: add new fields with new ids, never reuse one.
 *
 * Tensors: the first dimension of every tensor is the item dimension (one request may
 * carry several items); pipeline specs give the shape of one item.
 *   - fixed-width dtypes put their payload in `data`: little-endian, C (row-major) order,
 *     exactly prod(shape) * itemsize bytes;
 *   - STRING (UTF-8) and BYTES put one entry per element in `elements`, row-major.
 *
 * Size limits: the server refuses frames above its frame limit (64 MiB by default,
 * `max_frame_bytes` in the server config).  Apache clients cap strings and frames at
 * 16,384,000 bytes unless told otherwise (`string_length_limit` / `container_length_limit`
 * in Python, the max frame size of TFramedTransport in C++ and Java): raise those to send or
 * receive larger tensors.
 */
namespace py dagserve_idl
namespace cpp dagserve
namespace java io.dagserve.thrift
namespace go dagserve

enum DataType {
  BOOL = 0,
  UINT8 = 1,
  INT8 = 2,
  INT16 = 3,
  INT32 = 4,
  INT64 = 5,
  FLOAT16 = 6,
  FLOAT32 = 7,
  FLOAT64 = 8,
  STRING = 9,
  BYTES = 10,
}

struct Tensor {
  1: required DataType dtype,
  2: required list<i64> shape,
  3: optional binary data,
  4: optional list<binary> elements,
}

struct InferRequest {
  1: required string pipeline,
  2: required map<string, Tensor> inputs,
  3: optional string request_id,
  4: optional i64 timeout_ms,
  5: optional list<string> outputs,
  6: optional string version,
  7: optional map<string, string> headers,
}

struct InferResponse {
  1: required string request_id,
  2: required map<string, Tensor> outputs,
  3: optional map<string, i64> node_latency_us,
  4: optional string version,
}

struct TensorSpec {
  1: required string name,
  2: required DataType dtype,
  3: required list<i64> shape,        // one item's shape; -1 = any size
  4: optional bool is_optional = false,  // "optional" is a Thrift keyword
}

struct Edge {
  1: required string source,          // "$inputs" or a node name
  2: required string target,          // a node name or "$outputs"
  3: required string tensor,          // the tensor that flows: "NAME" or "NODE.OUTPUT"
}

struct PipelineInfo {
  1: required string name,
  2: required string version,
  3: required list<TensorSpec> inputs,
  4: required list<TensorSpec> outputs,
  5: required list<string> nodes,
  6: required list<Edge> edges,
}

struct HealthStatus {
  1: required bool live,
  2: required bool ready,
  3: optional map<string, string> details,
}

exception InvalidRequest {
  1: required string message,
  2: optional string field,           // e.g. "inputs.image.shape"
}

exception PipelineNotFound {
  1: required string message,
}

exception Overloaded {
  1: required string message,
  2: optional i32 retry_after_ms,
}

exception DeadlineExceeded {
  1: required string message,
}

exception InferenceError {
  1: required string message,
  2: optional string node,
}

service InferenceService {
  InferResponse infer(1: InferRequest request)
    throws (1: InvalidRequest invalid, 2: PipelineNotFound not_found, 3: Overloaded overloaded,
            4: DeadlineExceeded deadline, 5: InferenceError error),
  list<PipelineInfo> list_pipelines(),
  PipelineInfo describe(1: string pipeline) throws (1: PipelineNotFound not_found),
  HealthStatus health(),
}
