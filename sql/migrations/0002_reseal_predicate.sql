-- Whether a connection's value holds a secret that rotate_keys() must reseal: an envelope
-- (an object with "$enc") at the top level or under "credentials" that names another key
-- id than the primary, or plaintext left in one of the given secret fields. The vault makes
-- the final decision per row, so this only needs to be a superset of it.
CREATE FUNCTION {schema}.needs_reseal(value jsonb, primary_kid text, secret_fields text[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT jsonb_path_exists(value, '$.* ? (exists (@."$enc") && @.kid != $kid)',
                             jsonb_build_object('kid', primary_kid))
        OR jsonb_path_exists(value, '$.credentials.* ? (exists (@."$enc") && @.kid != $kid)',
                             jsonb_build_object('kid', primary_kid))
        OR EXISTS (
            SELECT 1 FROM jsonb_each(value) AS f (field, value)
            WHERE f.field = ANY (secret_fields)
              AND f.value <> 'null'::jsonb
              AND NOT (jsonb_typeof(f.value) = 'object' AND f.value ? '$enc')
              AND (f.field <> 'credentials' OR jsonb_typeof(f.value) <> 'object' OR EXISTS (
                  SELECT 1 FROM jsonb_each(f.value) AS c (field, value)
                  WHERE c.value <> 'null'::jsonb
                    AND NOT (jsonb_typeof(c.value) = 'object' AND c.value ? '$enc')))
        )
$$;
