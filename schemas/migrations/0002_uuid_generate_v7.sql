-- RFC 9562 UUIDv7: 48-bit Unix milliseconds, version 7, 74 random bits.
-- The application generates ids itself; this default makes hand-inserted rows
-- time-ordered too (PostgreSQL 15 has no native v7). Left alone if a
-- uuid_generate_v7() already exists, e.g. from the pg_uuidv7 extension.
DO $do$
BEGIN
    IF to_regprocedure('public.uuid_generate_v7()') IS NULL THEN
        CREATE FUNCTION public.uuid_generate_v7() RETURNS uuid
        LANGUAGE plpgsql VOLATILE PARALLEL SAFE
        AS $fn$
        DECLARE
            -- clock_timestamp, not now(): rows of one transaction still get increasing ids
            unix_ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
            -- gen_random_uuid already sets the RFC variant bits (10xx) in byte 8
            bytes bytea := uuid_send(gen_random_uuid());
        BEGIN
            -- bytes 0-5: the low 48 bits of the big-endian millisecond count
            bytes := overlay(bytes PLACING substring(int8send(unix_ms) FROM 3) FROM 1 FOR 6);
            -- byte 6 high nibble: version 7
            bytes := set_byte(bytes, 6, (get_byte(bytes, 6) & 15) | 112);
            RETURN encode(bytes, 'hex')::uuid;
        END
        $fn$;
        COMMENT ON FUNCTION public.uuid_generate_v7() IS
            'RFC 9562 version 7 UUID (millisecond time prefix + random); no ordering within one millisecond';
    END IF;
END
$do$;
