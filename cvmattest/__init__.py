"""Attestation evidence for confidential VMs: fetch it in the guest, decode it, verify it.

A confidential VM proves what it is with *evidence* signed by its hardware:

* **AMD SEV-SNP**: a 1184-byte attestation report (:mod:`.snp`), signed by a per-chip VCEK
  (or a per-cloud VLEK) whose certificate chains to AMD's root key (:mod:`.verify_snp`).
  The VCEK for a chip and TCB comes from AMD's Key Distribution Service (:mod:`.kds`) or
  from the host, in the extended report's certificate table.
* **Intel TDX**: a DCAP quote (:mod:`.tdx`), signed by an attestation key that the quoting
  enclave vouches for under the platform's PCK certificate, which chains to Intel's SGX
  Root CA (:mod:`.verify_tdx`). The raw TDREPORT a TD can get by ioctl is MAC'd with a
  platform key and cannot be checked anywhere else.

The layers, from pure to I/O:

``binary``        bounds-checked field reads; :class:`MalformedEvidence` names field and offset
``snp``, ``tdx``  layouts and parsers (bytes in, frozen dataclasses out)
``certs``         certificate loading (AMD's serial-0 quirk), AMD extensions, pinned roots
``verify_*``      every check, recorded in a :class:`~.result.VerificationResult`
``detect``        which kind of evidence a blob is, from its first bytes
``intel_tcb``     Intel collateral (TCB Info, QE identity, CRLs) and the TDX TCB status it gives
``polite_http``   retries, backoff and the on-disk cache shared by the two clients below
``kds``           AMD KDS client: VCEKs, chains and AMD's CRL
``pcs``           Intel PCS client: a TDX quote's collateral, cached until it expires
``uapi``          kernel ioctl numbers and structure layouts (sev-guest.h, tdx-guest.h)
``guest``         in-guest fetch: configfs-tsm, /dev/sev-guest, /dev/tdx_guest, with timings
"""
