// Run-time choice of the kernel table (dispatch.cpp).
#pragma once

#include <string>
#include <vector>

#include "flare_native.h"

namespace flare_native {

// The table in use: the best one this CPU supports, or FLARE_KERNELS_CPU_ISA, or set_isa's.
const KernelTable& active_table();
// Names this CPU can run, from the most portable to the fastest.
std::vector<std::string> supported_isas();
// Names compiled into this build.
std::vector<std::string> built_isas();
// Select by name ("auto" or "" = the best supported); returns the name now active.
std::string set_isa(const std::string& name);

}  // namespace flare_native
