"""appliance.secure: the encrypted, signed, per-device model store (device side) and the tools
that package and watermark models for it (host side).

Device side (light: `cryptography` + `python-pkcs11`; never imports appliance.image,
appliance.provision, tflite or matplotlib):

    from appliance.secure.backend import Pkcs11Backend, TokenConfig
    from appliance.secure.store import DeviceStore, load_vendor_public_key
    from appliance.secure.source import SecureModelSource

    backend = Pkcs11Backend(TokenConfig(module="/usr/lib/softhsm/libsofthsm2.so",
                                        token_label="appliance", pin_file="/data/secure/token.pin"))
    pem = backend.ensure_device_key()           # RSA-2048 generated on the token; public PEM out
    store = DeviceStore("/data/secure/store", backend,
                        load_vendor_public_key("/etc/appliance/vendor-ed25519.pub"), board="qemu-arm64")
    store.install(package_bytes)                # signature, board, anti-rollback, decrypt check
    store.list()                                # [InstalledInfo(name, version, highest_accepted, ...)]
    model = store.load("detector")              # .name .version .content (bytes, RAM only) .manifest
    fd, manifest = store.load_memfd("detector") # sealed memfd; TFLite loads /proc/self/fd/FD
    source = SecureModelSource(store)           # the runtime's model-source interface
    source = SecureModelSource.from_env()       # same env variables as `appliance-agent store`

    CLI: `appliance-agent store keygen|install|list|check` -> appliance.secure.agent:main(argv)

    In the image (templates under image/templates/rootfs): SoftHSM2's config is
    /etc/appliance/softhsm2.conf (token dir /data/secure/tokens), the store /data/secure/store,
    the per-device PIN /data/secure/token.pin (0600 root), all made on first boot by
    appliance-store-init.service (`store keygen --init-softhsm --create-pin`). The runtime runs
    as a dynamic user in group softhsm with `--store-dir /data/secure/store` and the PIN as a
    systemd credential; `SecureModelSource.version(name)` lets its hot reload skip unchanged
    models without touching the token.

Host side:

    from appliance.secure.envelope import Manifest, build_package, rewrap
    pkg = build_package(model_bytes, Manifest(name, version, sha256_hex, size, boards, watermark_id),
                        vendor_ed25519_private_key, device_public_pem, oaep_hash="SHA-1")
    rotated = rewrap(pkg, backend_holding_old_key, new_device_public_pem)  # data key only

    from appliance.secure import watermark
    marked = watermark.embed(tflite_bytes, key_bytes, device_id_int).model
    result = watermark.verify(suspect_bytes, key_bytes, candidates=[id, ...])  # .detected .device_id .z

    CLI: `appliance-secure vendor-key|package|watermark embed|watermark verify` -> appliance.secure.cli:main

Errors: every refusal raises a subclass of `appliance.secure.errors.SecureError` whose str() is
one line: SignatureError, RollbackError, BoardMismatchError, IntegrityError (GCM / hash / seal),
WrongDeviceError, TokenMissingError, TokenLockedError (PIN rejected or locked), CounterError,
FormatError (strict parser), StoreError.
"""
