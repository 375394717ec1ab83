// Generated from agentrun.wire.limits by `make gen` (scripts/gen_limits.py). Do not edit.
// The limits a request must keep; the server answers past one with a
// status naming it. IDENTIFIER_PATTERN is a RegExp source (workflow, stage and
// pathway names).
export const MAX_ATTEMPTS = 100;
export const MAX_DELAY_SECONDS = 604800;
export const MAX_DESCRIPTION_BYTES = 65536;
export const MAX_FILTER_TEXT_CHARS = 256;
export const MAX_IDENTIFIER_CHARS = 128;
export const MAX_IDS_PER_REQUEST = 10000;
export const MAX_LEASE_SECONDS = 604800;
export const MAX_NAME_BYTES = 256;
export const MAX_OUTPUT_BYTES = 1048576;
export const MAX_PATHWAYS = 64;
export const MAX_RUN_FILTERS = 8;
export const MAX_STAGES = 200;
export const MAX_VALUE_DEPTH = 20;
export const IDENTIFIER_PATTERN = "^[A-Za-z0-9._-]{1,128}$";
// How a client reaches a server: default address, message size, environment.
export const DEFAULT_PORT = 50051;
export const DEFAULT_SERVER = "127.0.0.1:50051";
export const ENV_API_KEY = "AGENTRUN_API_KEY";
export const ENV_SERVER = "AGENTRUN_SERVER";
export const ENV_TLS = "AGENTRUN_TLS";
export const ENV_TLS_CA = "AGENTRUN_TLS_CA";
export const ENV_TLS_CERT = "AGENTRUN_TLS_CERT";
export const ENV_TLS_KEY = "AGENTRUN_TLS_KEY";
export const ENV_TLS_SERVER_NAME = "AGENTRUN_TLS_SERVER_NAME";
export const MAX_MESSAGE_BYTES = 67108864;
export const URL_SCHEMES = {"grpcs://": true, "https://": true, "grpc://": false, "http://": false};
