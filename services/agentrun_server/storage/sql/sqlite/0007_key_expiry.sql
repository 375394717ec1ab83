-- A key may expire (issue 23): refused from `expires_at` on, as if revoked then. NULL: never.
ALTER TABLE api_keys ADD COLUMN expires_at REAL;
