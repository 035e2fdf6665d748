// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unmapping one page, where "it was not mapped" is an answer, not a failure.

use guest_memfd::PAGE_SIZE;
use vfio_ioctls::{VfioError, VfioOps};

use crate::mapper::Error;

/// The page is no longer mapped (it was unmapped now, or something else had unmapped it).
pub(crate) struct Unmapped;

/// Unmaps the page at `iova`. An IOVA the IOMMU does not map (the VMM unmapped it, or
/// type1 dropped every mapping when the device's group left the container) is not a
/// failure: type1 answers with an unmapped size of 0 (`InvalidDmaUnmapSize` in
/// vfio-ioctls) and iommufd with `ENOENT`.
pub(crate) fn unmap_page(iommu: &dyn VfioOps, iova: u64) -> Result<Unmapped, Error> {
    match iommu.vfio_dma_unmap(iova, PAGE_SIZE as usize) {
        Ok(()) => Ok(Unmapped),
        Err(VfioError::InvalidDmaUnmapSize) => Ok(Unmapped),
        Err(VfioError::IommufdIoctlError(iommufd_ioctls::IommufdError::IommuIoasUnmap(e)))
            if e.errno() == libc::ENOENT =>
        {
            Ok(Unmapped)
        }
        Err(source) => Err(Error::Unmap { iova, source }),
    }
}
