# ctest driver: configure, build and run a project that add_subdirectory()s normtweak.
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}")
  endif()
endfunction()
run(${CMAKE_COMMAND} -S ${NT_SOURCE_DIR}/tests/add_subdirectory -B ${NT_WORK_DIR} -G ${NT_GENERATOR}
    -DCMAKE_BUILD_TYPE=Release -DNT_SOURCE_DIR=${NT_SOURCE_DIR})
run(${CMAKE_COMMAND} --build ${NT_WORK_DIR} -j 2 --target consumer)
run(${NT_WORK_DIR}/consumer)
