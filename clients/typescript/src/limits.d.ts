// Generated from agentrun.wire.limits by `make gen` (scripts/gen_limits.py). Do not edit.
export declare const MAX_ATTEMPTS: number;
export declare const MAX_DELAY_SECONDS: number;
export declare const MAX_DESCRIPTION_BYTES: number;
export declare const MAX_IDENTIFIER_CHARS: number;
export declare const MAX_IDS_PER_REQUEST: number;
export declare const MAX_LEASE_SECONDS: number;
export declare const MAX_NAME_BYTES: number;
export declare const MAX_OUTPUT_BYTES: number;
export declare const MAX_PATHWAYS: number;
export declare const MAX_STAGES: number;
export declare const MAX_VALUE_DEPTH: number;
export declare const IDENTIFIER_PATTERN: string;
