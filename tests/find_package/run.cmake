# ctest driver: install the build tree into a scratch prefix, then configure,
# build and run the consumer project against it.
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}")
  endif()
endfunction()
file(REMOVE_RECURSE ${NT_WORK_DIR})
run(${CMAKE_COMMAND} --install ${NT_BUILD_DIR} --prefix ${NT_WORK_DIR}/prefix)
run(${CMAKE_COMMAND} -S ${NT_SOURCE_DIR}/tests/find_package -B ${NT_WORK_DIR}/build -G ${NT_GENERATOR}
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${NT_WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --build ${NT_WORK_DIR}/build -j 2)
run(${NT_WORK_DIR}/build/consumer)
run(${NT_WORK_DIR}/build/consumer_header_only)
