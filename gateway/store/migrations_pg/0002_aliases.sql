-- Accounts that declared they are also another account (the new account's half
-- of a move): (platform, native) says it is also (aka_platform, aka_native).
CREATE TABLE aliases (
    platform     TEXT NOT NULL,
    native       TEXT NOT NULL,
    aka_platform TEXT NOT NULL,
    aka_native   TEXT NOT NULL,
    declared     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (platform, native, aka_platform, aka_native)
);
